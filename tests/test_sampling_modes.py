"""Every way to sample a trained model: the API on small models, and `dalle2 sample`'s modes on an imported run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2 import DALLE2, Decoder, DiffusionPrior, DiffusionPriorNetwork, Unet
from dalle2.text_to_image import slerp
from jobs import cli
from tests.test_decoder import cascade, shape_images
from tests.test_import_weights import imported


def clip_prior(clip):
    net = DiffusionPriorNetwork(dim=32, depth=1, heads=2, dim_head=16, embed_dim=clip.embed_dim)
    return DiffusionPrior(net=net, clip=clip, timesteps=20, sample_timesteps=5, condition_on_text_encodings=False).eval()


def test_a_negative_prompt_replaces_the_null_conditioning_of_the_priors_guidance(tiny_clip):
    torch.manual_seed(0)
    prior = clip_prior(tiny_clip)
    texts = ["a red circle", "a blue square"]

    def draw(**kwargs):
        return prior.sample(text=texts, generator=torch.Generator().manual_seed(1), num_samples_per_batch=1, **kwargs)

    unguided, guided = draw(cond_scale=1.0), draw(cond_scale=3.0)
    # guidance away from the prompt itself is no guidance: null + s * (cond - null) with null = cond
    torch.testing.assert_close(draw(cond_scale=3.0, negative_text=texts), unguided)
    away = draw(cond_scale=3.0, negative_text=["a green triangle"] * 2)
    assert not torch.allclose(away, guided) and not torch.allclose(away, unguided)
    with pytest.raises(ValueError, match="1 negative texts for 2 texts"):
        draw(cond_scale=3.0, negative_text=["x"])


def test_slerp_keeps_unit_norm_and_equal_angles_and_its_endpoints_exactly():
    torch.manual_seed(0)
    start, end = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    path = slerp(start, end, torch.linspace(0, 1, 6))
    assert torch.equal(path[0], start) and torch.equal(path[-1], end)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(6))
    steps = (path[:-1] * path[1:]).sum(-1).arccos()
    torch.testing.assert_close(steps, steps.mean().expand(5), atol=1e-4, rtol=0)
    assert steps.sum() == pytest.approx(float((start @ end).arccos()), abs=1e-4)  # along the great circle
    same = slerp(start, start, torch.linspace(0, 1, 3))
    torch.testing.assert_close(same, start.expand(3, -1))


def test_upscaling_starts_at_the_upsampler_and_a_one_unet_decoder_refuses(tiny_clip):
    torch.manual_seed(0)
    decoder = cascade(clip_dim=tiny_clip.embed_dim).eval()
    model = DALLE2(clip_prior(tiny_clip), decoder)
    calls = [0, 0]
    for i, unet in enumerate(decoder.unets):
        unet.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    images = shape_images(2, 16)
    out = model.upscale(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32) and calls[0] == 0 and calls[1] > 0
    # conditioned on the images' own CLIP embeds: the same as passing them
    again = model.upscale(images, image_embed=tiny_clip.embed_image(images), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)
    # the given images are the upsampler's low-resolution input: other images, another result (the same embeds)
    other = model.upscale(images.flip(-1), image_embed=tiny_clip.embed_image(images),
                          generator=torch.Generator().manual_seed(0))
    assert (other - out).abs().mean() > 1e-3
    one = DALLE2(clip_prior(tiny_clip), Decoder(unet=Unet(dim=8, dim_mults=(1,), image_embed_dim=tiny_clip.embed_dim,
                                                          layer_attns=False, layer_cross_attns=False),
                                                image_sizes=(16,), timesteps=10))
    with pytest.raises(ValueError, match="one unet"):
        one.upscale(images)


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    """DALLE2-pytorch's small trained prior and 16 px decoder (on text encodings), imported into a run."""
    root = tmp_path_factory.mktemp("modes") / "run"
    imported(root, "--set", "sampling.prior_cond_scale=2", "--set", "sampling.decoder_cond_scale=2")
    return str(root)


def sample(tmp_path, root: str, name: str, *flags: str) -> tuple[np.ndarray, dict]:
    out = tmp_path / f"{name}.png"
    assert cli.main(["sample", "--root", root, "--steps", "8", "--out", str(out), "--out-npy",
                     str(tmp_path / f"{name}.npy"), *flags]) == 0
    grid = Image.open(out)
    assert grid.size[0] > 16 and grid.size[1] > 16
    return np.load(tmp_path / f"{name}.npy"), json.loads((tmp_path / f"{name}.json").read_text())


def test_every_mode_of_dalle2_sample_writes_its_grid_and_arrays(tmp_path, imported_run):
    red, blue = "a red square", "a blue circle"
    plain_red, meta = sample(tmp_path, imported_run, "red", "--prompt", red, "--n", "1")
    plain_blue, _ = sample(tmp_path, imported_run, "blue", "--prompt", blue, "--n", "1")
    assert meta["mode"] == "text" and meta["prompts"] == [red]

    # interpolation: its endpoints are the plain samples of the prompts, the frames between them new
    frames, meta = sample(tmp_path, imported_run, "between", "--interpolate", red, blue, "--frames", "4")
    assert frames.shape == (4, 16, 16, 3) and meta["mode"] == "interpolate" and meta["rows"] == [f"{red} -> {blue}"]
    assert np.array_equal(frames[0], plain_red[0]) and np.array_equal(frames[-1], plain_blue[0])
    assert not np.array_equal(frames[1], frames[0]) and not np.array_equal(frames[2], frames[-1])

    # variations of two image files, and an interpolation from an image to a prompt
    for name, image in (("red.png", plain_red[0]), ("blue.png", plain_blue[0])):
        Image.fromarray(image).resize((40, 40)).save(tmp_path / name)
    varied, meta = sample(tmp_path, imported_run, "varied", "--vary", str(tmp_path / "red.png"), "--vary",
                          str(tmp_path / "blue.png"), "--n", "3")
    assert varied.shape == (6, 16, 16, 3) and meta["rows"] == [str(tmp_path / "red.png"), str(tmp_path / "blue.png")]
    assert len({varied[i].tobytes() for i in range(6)}) == 6
    mixed, _ = sample(tmp_path, imported_run, "mixed", "--interpolate", str(tmp_path / "red.png"), blue, "--frames", "3")
    assert mixed.shape == (3, 16, 16, 3) and np.array_equal(mixed[-1], plain_blue[0])

    # inpainting: the black part of the mask is kept, pixel for pixel at the run's size, the white part redrawn
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 20:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(plain_red[0]).save(tmp_path / "red16.png")
    painted, meta = sample(tmp_path, imported_run, "painted", "--inpaint", str(tmp_path / "red16.png"), "--mask",
                           str(tmp_path / "mask.png"), "--prompt", blue, "--n", "2", "--sampler", "ddim")
    assert painted.shape == (2, 16, 16, 3) and meta["mode"] == "inpaint"
    assert np.array_equal(painted[:, :, :8], np.broadcast_to(plain_red[0][:, :8], (2, 16, 8, 3)))
    assert np.abs(painted[:, :, 8:].astype(int) - plain_red[0][:, 8:]).mean() > 2

    # a negative prompt moves the prior's guidance off it
    negative, meta = sample(tmp_path, imported_run, "negative", "--prompt", red, "--n", "1", "--negative-prompt", blue)
    assert meta["negative_prompt"] == blue and not np.array_equal(negative, plain_red)


def test_dalle2_sample_refuses_what_it_cannot_do_naming_the_cause(tmp_path, imported_run, capsys):
    (tmp_path / "not-an-image.png").write_bytes(b"<html>nope</html>")
    refusals = {
        ("--vary", str(tmp_path / "not-an-image.png")): "not-an-image.png: not a PNG/JPEG/WEBP image",
        ("--vary", str(tmp_path / "not-an-image.png"), "--prompt", "x"): "--vary takes no --prompt",
        ("--interpolate", "a", "b", "--negative-prompt", "c"): "--negative-prompt guides text to image only",
        ("--vary", str(tmp_path / "missing.png")): "missing.png: cannot be read",
        ("--upscale", str(tmp_path / "not-an-image.png")): "not-an-image.png",
        ("--prompt", "a red square", "--negative-prompt", "blue", "--prior-cond-scale", "1"): "--prior-cond-scale",
        ("--inpaint", str(tmp_path / "not-an-image.png"), "--prompt", "x"): "--mask",
        ("--vary", "a.png", "--upscale", "b.png"): "one mode at a time",
    }
    for flags, reason in refusals.items():
        with pytest.raises(SystemExit, match=reason):
            cli.main(["sample", "--root", imported_run, "--out", str(tmp_path / "x.png"), *flags])
    Image.new("RGB", (16, 16)).save(tmp_path / "small.png")
    with pytest.raises(SystemExit, match="one unet"):  # the imported decoder has no upsampler
        cli.main(["sample", "--root", imported_run, "--upscale", str(tmp_path / "small.png"),
                  "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_given_images_are_refused_before_decoding_when_too_large_or_not_a_web_format(tmp_path):
    import io
    import struct
    import zlib

    from jobs.generation import ImageError, decode_image

    def png_header(width: int, height: int) -> bytes:  # a valid PNG signature and IHDR, no pixels
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
                + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + struct.pack(">I", 0) + b"IDAT"
                + struct.pack(">I", zlib.crc32(b"IDAT")))

    with pytest.raises(ImageError, match="bomb: 5000x5000 pixels, more than"):  # ours, from the header alone
        decode_image(png_header(5000, 5000), "bomb")
    with pytest.raises(ImageError, match="bomb2: not a PNG/JPEG/WEBP image.*DecompressionBomb"):  # Pillow's own limit
        decode_image(png_header(200000, 200000), "bomb2")
    for fmt in ("BMP", "GIF", "TIFF"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=fmt)
        with pytest.raises(ImageError, match="not a PNG/JPEG/WEBP image"):
            decode_image(buffer.getvalue(), f"an {fmt}")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(buffer, format="WEBP", lossless=True)
    pixels = decode_image(buffer.getvalue(), "ok")
    assert pixels.shape == (3, 6, 8) and pixels[0].min() == 1.0
    with pytest.raises(ImageError, match="more than the"):
        decode_image(b"\0" * (16 * 2**20 + 1), "huge")


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the demo run, if no test made it yet
def test_variations_of_the_demos_training_images_are_closer_to_their_source_than_to_the_others(demo_run):
    """Six training images of six colours, four variations each: in the run's CLIP space a variation is nearest its
    own source far more often than the 1 in 6 of chance."""
    from jobs.generation import RunModel, decode_image
    from jobs.sample import stack
    from pipeline.formats.queries import complete_shards
    from pipeline.formats.shard_reader import image_of, iter_samples
    from pipeline.run.layout import RunLayout

    assert demo_run.done.returncode == 0, demo_run.done.stderr[-3000:]
    layout = RunLayout(demo_run.root)
    sources, colours = [], set()
    for key, fields in iter_samples(layout.shard_tar(complete_shards(layout)[0])):
        colour = fields["txt"].decode().split()[1]
        if colour not in colours:
            colours.add(colour)
            sources.append(decode_image(image_of(fields), key))
        if len(sources) == 6:
            break
    model = RunModel(demo_run.root)
    images = stack(sources, model.image_size)
    varied = model.variations(images, 4, seed=0)
    assert varied.shape == (24, 3, 32, 32)
    clip = model.model.clip
    similarity = clip.embed_image(varied) @ clip.embed_image(images).T  # [24 variations, 6 sources]
    own = torch.arange(24) // 4
    nearest_own = (similarity.argmax(dim=1) == own).float().mean().item()
    margin = (similarity[torch.arange(24), own] - similarity.masked_fill(
        torch.nn.functional.one_hot(own, 6).bool(), -2).max(dim=1).values).mean().item()
    assert nearest_own >= 0.75 and margin > 0, (nearest_own, margin)
