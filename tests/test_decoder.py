"""The U-Net, the decoder cascade, its trainer, and DALLE2 end to end."""

import numpy as np
import pytest
import torch

from dalle2 import DALLE2, Decoder, DecoderTrainer, DiffusionPrior, DiffusionPriorNetwork, Unet, to_pil
from dalle2.checkpoint import ConfigMismatchError
from jobs.shapes import all_specs, draw

EMBED = 32


def shape_images(count: int, size: int) -> torch.Tensor:
    specs = all_specs()[:: len(all_specs()) // count][:count]
    return torch.stack([torch.from_numpy(np.array(draw(s, size))).permute(2, 0, 1).float() / 255 for s in specs])


@pytest.mark.parametrize(
    "kwargs, batch, size",
    [
        (dict(dim=16, dim_mults=(1, 2, 4), layer_attns=False, layer_cross_attns=False), 3, 32),
        (dict(dim=16, dim_mults=(1, 2), layer_cross_attns=(False, True), cond_on_text_encodings=True), 5, 16),
        (dict(dim=16, dim_mults=(1, 3, 5), num_resnet_blocks=(1, 2, 1), layer_attns=(False, True, True)), 1, 24),
        (dict(dim=8, dim_mults=(1, 2), lowres_cond=True, channels=1, groups=4), 2, 16),
    ],
)
def test_unet_output_shapes(kwargs, batch, size):
    unet = Unet(image_embed_dim=EMBED, text_encoding_dim=12, **kwargs)
    channels = unet.config.channels
    x, t = torch.randn(batch, channels, size, size), torch.randint(0, 100, (batch,))
    extra = {}
    if unet.config.cond_on_text_encodings:
        extra.update(text_encodings=torch.randn(batch, 7, 12), text_mask=torch.arange(7).expand(batch, 7) < 4)
    if unet.config.lowres_cond:
        extra.update(lowres_cond_img=torch.randn(batch, channels, size, size), lowres_noise_times=torch.zeros(batch).long())
    out = unet(x, t, image_embed=torch.randn(batch, EMBED), **extra)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unet_rejects_sizes_it_cannot_halve():
    unet = Unet(dim=8, dim_mults=(1, 2, 4), image_embed_dim=EMBED, groups=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        unet(torch.randn(1, 3, 18, 18), torch.zeros(1).long(), torch.randn(1, EMBED))


def overfit_decoder():
    unet = Unet(dim=16, dim_mults=(1, 3, 8), image_embed_dim=EMBED, num_resnet_blocks=1, learned_variance=True,
                layer_attns=(False, False, True), layer_cross_attns=(False, False, True))
    return Decoder(unet=unet, image_sizes=32, timesteps=100, sample_timesteps=20, predict="x0", image_cond_drop_prob=0.0)


@pytest.mark.slow
def test_decoder_overfits_eight_images():
    torch.manual_seed(0)
    images = shape_images(8, 32)
    embeds = torch.nn.functional.normalize(torch.randn(8, EMBED), dim=-1)
    trainer = DecoderTrainer(overfit_decoder(), lr=1e-3, warmup_steps=20, ema_beta=0.95)
    # 150 steps at widths 16 / 48 / 128: the loss falls to ~3% of its start and every sample is closest to its own
    # image (8 of 8, a tenth of the distance to the others)
    losses = [trainer.train_step({"image": images, "image_embed": embeds}) for _ in range(150)]
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20])
    samples = trainer.sample(image_embed=embeds, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (8, 3, 32, 32) and samples.min() >= 0 and samples.max() <= 1
    mse = ((samples[:, None] - images[None]) ** 2).mean(dim=(2, 3, 4))  # [sample, image]
    own_is_closest = (mse.argmin(dim=1) == torch.arange(8)).sum().item()
    assert own_is_closest >= 7, mse


def cascade(clip_dim=EMBED):
    base = Unet(dim=16, dim_mults=(1, 2), image_embed_dim=clip_dim, layer_attns=False, layer_cross_attns=(False, True),
                learned_variance=True)
    upsampler = Unet(dim=8, dim_mults=(1, 2), image_embed_dim=clip_dim, lowres_cond=True, groups=4,
                     layer_attns=False, layer_cross_attns=False)
    return Decoder(unet=[base, upsampler], image_sizes=(16, 32), timesteps=50, sample_timesteps=8)


def test_two_stage_cascade_trains_each_unet_separately_and_samples_at_32():
    torch.manual_seed(0)
    decoder = cascade()
    images, embeds = shape_images(4, 32), torch.randn(4, EMBED)
    # Training stage 2 never touches stage 1: it can stay off the device entirely ("meta" holds no data).
    decoder.unets[0].to("meta")
    trainer2 = DecoderTrainer(decoder, unet_numbers=[2], lr=1e-3)
    before = [p.clone() for p in decoder.unets[1].parameters()]
    for _ in range(3):
        trainer2.train_step({"image": images, "image_embed": embeds}, unet_number=2)
    assert trainer2.steps == [3]
    assert any(not torch.equal(a, b) for a, b in zip(before, decoder.unets[1].parameters()))
    with pytest.raises(ValueError, match="not unet 1"):
        trainer2.train_step({"image": images, "image_embed": embeds}, unet_number=1)

    decoder = cascade()
    trainer = DecoderTrainer(decoder, lr=1e-3)
    for number in (1, 2):
        assert trainer.train_step({"image": images, "image_embed": embeds}, unet_number=number) > 0
    assert trainer.steps == [1, 1]
    samples = trainer.sample(image_embed=embeds[:2], cond_scale=2.0)
    assert samples.shape == (2, 3, 32, 32)
    low = trainer.sample(image_embed=embeds[:2], stop_at_unet_number=1)
    assert low.shape == (2, 3, 16, 16)


def test_cond_scale_one_equals_sampling_without_guidance():
    torch.manual_seed(0)
    decoder = cascade().eval()
    embeds = torch.randn(2, EMBED)
    guided = decoder.sample(image_embed=embeds, cond_scale=1.0, generator=torch.Generator().manual_seed(3))
    unet, diffusion = decoder.unets[0], decoder.diffusions[0]
    plain = diffusion.sample(lambda x, t: unet(x, t, embeds), (2, 3, 16, 16), sample_timesteps=8,
                             x0_transform=decoder.threshold, generator=torch.Generator().manual_seed(3))
    first_stage = decoder.sample(image_embed=embeds, cond_scale=1.0, stop_at_unet_number=1,
                                 generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first_stage, (plain.clamp(-1, 1) + 1) / 2)
    assert guided.shape == (2, 3, 32, 32)
    stronger = decoder.sample(image_embed=embeds, cond_scale=3.0, stop_at_unet_number=1,
                              generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(stronger, first_stage)


def test_inpainting_keeps_known_pixels():
    torch.manual_seed(0)
    decoder = cascade().eval()
    image = shape_images(2, 32)
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[:, :, :16] = True  # keep the left half
    out = decoder.sample(image_embed=torch.randn(2, EMBED), inpaint_image=image, inpaint_mask=mask, inpaint_resample_times=2)
    assert (out[..., :16] - image[..., :16]).abs().max() < 1e-5
    assert (out[..., 16:] - image[..., 16:]).abs().mean() > 1e-3


def test_checkpoint_round_trip_gives_identical_samples(tmp_path):
    torch.manual_seed(0)
    trainer = DecoderTrainer(cascade(), lr=1e-3)
    images, embeds = shape_images(2, 32), torch.randn(2, EMBED)
    for number in (1, 2):
        trainer.train_step({"image": images, "image_embed": embeds}, unet_number=number)
    trainer.save(str(tmp_path / "decoder"))
    restored = DecoderTrainer(cascade(), lr=1e-3)
    restored.load(str(tmp_path / "decoder"))
    assert restored.steps == [1, 1]
    a = trainer.sample(image_embed=embeds, generator=torch.Generator().manual_seed(5))
    b = restored.sample(image_embed=embeds, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    wider = Decoder(unet=[Unet(dim=24, dim_mults=(1, 2), image_embed_dim=EMBED, learned_variance=True), cascade().unets[1]],
                    image_sizes=(16, 32), timesteps=50, sample_timesteps=8)
    with pytest.raises(ConfigMismatchError, match=r"unets\[0\]\.dim: checkpoint 16, model 24"):
        DecoderTrainer(wider).load(str(tmp_path / "decoder"))


def test_dalle2_turns_a_string_into_an_image(tiny_clip):
    torch.manual_seed(0)
    dim = tiny_clip.embed_dim
    prior = DiffusionPrior(net=DiffusionPriorNetwork(dim=32, depth=1, heads=2, dim_head=16, embed_dim=dim),
                           clip=tiny_clip, timesteps=20, sample_timesteps=4, condition_on_text_encodings=True)
    unet = Unet(dim=16, dim_mults=(1, 2), image_embed_dim=dim, cond_on_text_encodings=True,
                text_encoding_dim=tiny_clip.text_encoding_dim, layer_attns=False, layer_cross_attns=(False, True))
    decoder = Decoder(unet=unet, clip=tiny_clip, image_sizes=16, timesteps=20, sample_timesteps=4)
    images = DALLE2(prior, decoder)(["a red circle on the left", "a blue square"], cond_scale=2.0)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    pils = to_pil(images)
    assert len(pils) == 2 and pils[0].size == (16, 16) and pils[0].mode == "RGB"


def test_a_trainer_of_one_stage_keeps_each_schedule_with_its_unet():
    decoder = cascade()
    DecoderTrainer(decoder, unet_numbers=[2], device="meta")  # "meta" stands for the GPU here
    # the trained unet and its noise schedule moved together; the other unet and its schedule stayed together
    assert next(decoder.unets[1].parameters()).device.type == "meta" == decoder.diffusions[1].betas.device.type
    assert next(decoder.unets[0].parameters()).device.type == "cpu" == decoder.diffusions[0].betas.device.type


def test_a_stage_trained_alone_upsamples_given_images_and_saves_only_itself(tmp_path):
    from safetensors.torch import load_file

    from dalle2.checkpoint import load_checkpoint

    torch.manual_seed(0)
    images, embeds = shape_images(2, 32), torch.randn(2, EMBED)
    trainer = DecoderTrainer(cascade(), unet_numbers=[2], lr=1e-3)
    trainer.train_step({"image": images, "image_embed": embeds}, unet_number=2)
    with pytest.raises(ValueError, match="pass start_image"):
        trainer.sample(image_embed=embeds)
    upsampled = trainer.sample(image_embed=embeds, start_image=images, generator=torch.Generator().manual_seed(1))
    other = trainer.sample(image_embed=embeds, start_image=1 - images, generator=torch.Generator().manual_seed(1))
    assert upsampled.shape == (2, 3, 32, 32) and (upsampled - other).abs().mean() > 1e-3  # it reads start_image

    trainer.save(str(tmp_path / "decoder"))
    for name in ("model.safetensors", "ema.safetensors"):
        keys = load_file(str(tmp_path / "decoder" / name))
        assert keys and all(k.startswith("unets.1.") for k in keys), name  # the untrained unet 1 is not saved
    fresh = cascade()
    untouched = {k: v.clone() for k, v in fresh.unets[0].state_dict().items()}
    state = load_checkpoint(str(tmp_path / "decoder"), fresh, fresh.config.model_dump(mode="json"), use_ema=True)
    assert state["parts"] == ["unets.1."]
    assert all(torch.equal(v, fresh.unets[0].state_dict()[k]) for k, v in untouched.items())
    with trainer.ema_weights():
        for key, value in trainer.model.unets[1].state_dict().items():
            assert torch.equal(value, fresh.unets[1].state_dict()[key]), key


def randomised(unet: Unet) -> Unet:
    """A unet whose zero-initialised output layers are not zero, so every input can show in the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet.eval()


def test_unet_output_depends_on_every_conditioning_and_not_on_masked_tokens():
    unet = randomised(Unet(dim=16, dim_mults=(1, 2), image_embed_dim=EMBED, text_encoding_dim=12, lowres_cond=True,
                           cond_on_text_encodings=True, layer_cross_attns=(False, True)))
    b, size = 2, 16
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(b, 3, size, size, generator=g), time=torch.full((b,), 10),
                  image_embed=torch.randn(b, EMBED, generator=g), text_encodings=torch.randn(b, 7, 12, generator=g),
                  text_mask=torch.arange(7).expand(b, 7) < 4, lowres_cond_img=torch.randn(b, 3, size, size, generator=g),
                  lowres_noise_times=torch.full((b,), 5))

    def run(**change):
        args = {**inputs, **change}
        with torch.no_grad():
            return unet(args["x"], args["time"], image_embed=args["image_embed"], text_encodings=args["text_encodings"],
                        text_mask=args["text_mask"], lowres_cond_img=args["lowres_cond_img"],
                        lowres_noise_times=args["lowres_noise_times"])

    out = run()
    for name, changed in [("image_embed", torch.randn(b, EMBED, generator=g)),
                          ("text_encodings", inputs["text_encodings"] + 1.0),
                          ("lowres_cond_img", torch.randn(b, 3, size, size, generator=g)),
                          ("lowres_noise_times", torch.full((b,), 40))]:
        assert not torch.allclose(run(**{name: changed}), out, atol=1e-4), f"the output ignores {name}"
    masked_changed = inputs["text_encodings"].clone()
    masked_changed[:, 4:] += 5.0  # tokens the mask hides
    torch.testing.assert_close(run(text_encodings=masked_changed), out)


def test_upsampler_training_blurs_at_the_low_resolution():
    from torchvision.transforms.functional import gaussian_blur

    from dalle2.decoder import blur_kernel, resize_image

    decoder = cascade()
    decoder.config.lowres_blur_prob, decoder.config.lowres_blur_sigma = 1.0, (0.8, 0.8)
    images = shape_images(2, 32)
    times = torch.zeros(2, dtype=torch.long)
    def condition(blur):
        return decoder.lowres_condition(images, 2, noise_times=times, blur=blur, generator=torch.Generator().manual_seed(0))[0]

    low, plain = condition(True), condition(False)
    small = resize_image(images, 16)
    expected = resize_image(gaussian_blur(small, kernel_size=blur_kernel(0.8), sigma=0.8), 32) * 2 - 1
    noise = torch.randn(low.shape, generator=torch.Generator().manual_seed(0))
    # blurred at 16 px, then upsampled, then noised (with the same noise)
    torch.testing.assert_close(low, decoder.diffusions[1].q_sample(expected, times, noise), atol=1e-5, rtol=0)
    assert (low - plain).abs().mean() > 0.01  # the blur changes the low-resolution content
    decoder.config.lowres_blur_prob = 0.0
    torch.testing.assert_close(condition(True), plain)


def test_per_unet_sample_timesteps_as_a_tuple():
    base = Unet(dim=8, dim_mults=(1, 2), image_embed_dim=EMBED, groups=4, layer_attns=False, layer_cross_attns=False)
    up = Unet(dim=8, dim_mults=(1, 2), image_embed_dim=EMBED, groups=4, lowres_cond=True, layer_attns=False,
              layer_cross_attns=False)
    decoder = Decoder(unet=[base, up], image_sizes=(8, 16), timesteps=100, sample_timesteps=(25, 4))
    assert [decoder.config.diffusion_for(i).sample_timesteps for i in (0, 1)] == [25, 4]
    assert all(decoder.config.diffusion_for(i).timesteps == 100 for i in (0, 1))


def test_the_first_unet_learns_its_variance_when_asked_and_guidance_leaves_it_alone():
    from dalle2.diffusion import classifier_free_guidance

    decoder = cascade()
    assert decoder.unets[0].final_conv.out_channels == 6 and decoder.unets[1].final_conv.out_channels == 3
    assert decoder.diffusions[0].learned_variance and not decoder.diffusions[1].learned_variance
    plain = Decoder(unet=Unet(dim=8, dim_mults=(1, 2), image_embed_dim=EMBED, groups=4), image_sizes=16,
                    learned_variance=False)
    assert plain.unets[0].final_conv.out_channels == 3 and not plain.diffusions[0].learned_variance

    def forward(x, t, drop):  # conditional rows output 1, null rows 0; the variance half differs too
        value = (~drop).float()[:, None, None, None] if drop is not None else torch.ones(len(x), 1, 1, 1)
        return torch.cat([value.expand(-1, 3, 2, 2), 5 * value.expand(-1, 3, 2, 2) + 7], dim=1)

    out = classifier_free_guidance(forward, cond_scale=3.0, guided_channels=3)(torch.zeros(2, 6, 2, 2), torch.zeros(2))
    assert torch.all(out[:, :3] == 3.0) and torch.all(out[:, 3:] == 12.0)  # guided mean, the conditional variance
    loss = decoder(shape_images(2, 32), image_embed=torch.randn(2, EMBED), unet_number=1)
    assert torch.isfinite(loss) and loss > 0


def test_a_decoder_keeps_the_unets_it_is_given_and_each_unets_own_settings():
    from dalle2.configs import DecoderConfig, UnetConfig

    torch.manual_seed(0)
    # as the README builds it: a unet of its own, then the decoder around it; its weights must be the ones used
    unet = Unet(dim=8, dim_mults=(1, 2), image_embed_dim=EMBED, groups=4)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    decoder = Decoder(unet=unet, image_sizes=16, timesteps=20, sample_timesteps=4)
    assert decoder.unets[0] is unet and not decoder.diffusions[0].learned_variance
    for name, value in decoder.unets[0].state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    # a cascade whose unets say [False, True]: each keeps its own, in the diffusion too
    base = Unet(dim=8, dim_mults=(1, 2), image_embed_dim=EMBED, groups=4, learned_variance=False)
    up = Unet(dim=8, dim_mults=(1, 2), image_embed_dim=EMBED, groups=4, lowres_cond=True, learned_variance=True)
    cascade_ = Decoder(unet=[base, up], image_sizes=(8, 16), timesteps=20)
    assert [u is g for u, g in zip(cascade_.unets, (base, up))] == [True, True]
    assert [d.learned_variance for d in cascade_.diffusions] == [False, True]
    assert [u.final_conv.out_channels for u in cascade_.unets] == [3, 6]
    # the same from configs alone: per-unet settings win over the decoder's default, unset ones take it
    config = DecoderConfig(unets=[UnetConfig(dim=8, dim_mults=(1, 2), groups=4, learned_variance=False),
                                  UnetConfig(dim=8, dim_mults=(1, 2), groups=4, lowres_cond=True, learned_variance=True)],
                           image_sizes=(8, 16))
    assert [u.learned_variance for u in config.unets] == [False, True]
    two = dict(unets=[UnetConfig(), UnetConfig(lowres_cond=True)], image_sizes=(8, 16))
    assert [u.learned_variance for u in DecoderConfig(**two).unets] == [False, False]  # the measured default
    assert [u.learned_variance for u in DecoderConfig(**two, learned_variance=True).unets] == [True, False]
    assert DecoderConfig(**config.model_dump()) == config  # a saved config reads back as it was
    # a real conflict names both fields instead of picking one
    with pytest.raises(ValueError, match=r"unets\[0\]\.learned_variance is False but learned_variance=True"):
        Decoder(unet=Unet(dim=8, dim_mults=(1, 2), image_embed_dim=EMBED, groups=4), image_sizes=16,
                learned_variance=True)
    # a given unet that does not match a given config is refused by field, never replaced by a fresh one
    with pytest.raises(ValueError, match=r"unets\[0\].*dim: the unet has 8, the config 16"):
        Decoder(unet=unet, config=DecoderConfig(unets=[UnetConfig(dim=16, dim_mults=(1, 2), groups=4)], image_sizes=16))
