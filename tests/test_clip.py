"""The CLIP adapter over open_clip, on the tiny registered architecture."""

from pathlib import Path

import pytest
import torch

from dalle2 import ClipAdapter
from dalle2.checkpoint import ConfigMismatchError, load_checkpoint
from dalle2.clip_spec import text_tower_unsupported


def test_shapes_and_unit_norms(tiny_clip):
    out = tiny_clip.embed_text(["a red square", "two small blue circles on the left"])
    assert out.text_embed.shape == (2, tiny_clip.embed_dim)
    assert out.text_encodings.shape == (2, tiny_clip.max_text_len, tiny_clip.text_encoding_dim)
    torch.testing.assert_close(out.text_embed.norm(dim=-1), torch.ones(2))
    # sot + words + eot: the longer caption has more real tokens; padding is masked out.
    assert 2 < out.mask[0].sum() < out.mask[1].sum() < tiny_clip.max_text_len
    image_embed = tiny_clip.embed_image(torch.rand(3, 3, 50, 41))  # any size is resized inside
    assert image_embed.shape == (3, tiny_clip.embed_dim)
    torch.testing.assert_close(image_embed.norm(dim=-1), torch.ones(3))


def test_tokenizer_works_offline_and_token_ids_match_strings(tiny_clip):
    tokens = tiny_clip.tokenize(["a green triangle"])
    assert tokens.dtype == torch.long and tokens.shape == (1, tiny_clip.max_text_len)
    assert tokens[0, 0] == tokens.max() - 1  # start-of-text precedes end-of-text in the vocab
    by_string = tiny_clip.embed_text(["a green triangle"]).text_embed
    by_ids = tiny_clip.embed_text(tokens).text_embed
    torch.testing.assert_close(by_string, by_ids)
    different = tiny_clip.embed_text(["a yellow star"]).text_embed
    assert not torch.allclose(by_string, different)


def test_preprocess_matches_model_input(tiny_clip):
    pixels = tiny_clip.preprocess(torch.rand(2, 3, 64, 96))
    assert pixels.shape == (2, 3, tiny_clip.image_size, tiny_clip.image_size)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_clip.preprocess(torch.rand(3, 32, 32))


@pytest.mark.parametrize("root", ["local", "memory://clip-roundtrip"])
def test_save_load_gives_identical_outputs(tiny_clip, tmp_path, root):
    root = str(tmp_path / "clip") if root == "local" else root
    tiny_clip.save(root)
    loaded = ClipAdapter.from_checkpoint(root)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.embed_image(images), tiny_clip.embed_image(images), rtol=1e-6, atol=1e-6)
    texts = ["a red square", "a blue circle"]
    torch.testing.assert_close(loaded.embed_text(texts).text_encodings, tiny_clip.embed_text(texts).text_encodings, rtol=1e-6, atol=1e-6)


def test_loading_into_another_architecture_names_the_field(tiny_clip, tmp_path):
    tiny_clip.save(str(tmp_path / "clip"))
    other = ClipAdapter("small-clip")
    with pytest.raises(ConfigMismatchError, match="model_name: checkpoint 'tiny-clip', model 'small-clip'"):
        load_checkpoint(str(tmp_path / "clip"), other.model, other.checkpoint_config())


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="no-such-clip"):
        ClipAdapter("no-such-clip")


@pytest.mark.parametrize("name", ["tiny-clip", "ViT-B-32"])
def test_embed_text_equals_open_clips_own_encode_text(name):
    torch.manual_seed(0)
    clip = ClipAdapter(name).eval()
    texts = ["a red circle on the left", "a blue square", ""]
    ours = clip.embed_text(texts)
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenize(texts)).float(), dim=-1)
    torch.testing.assert_close(ours.text_embed, theirs, atol=1e-5, rtol=1e-5)
    assert ours.mask.sum(1).tolist()[2] == 2  # start and end tokens of the empty caption


def test_trimmed_padding_gives_the_same_text_embeds(tiny_clip):
    captions = ["a red square", "", "a much longer caption about a small blue circle in the center, on a white field"]
    full, trimmed = tiny_clip.embed_text(captions), tiny_clip.embed_text(captions, trim_padding=True)
    longest = int(tiny_clip.tokenize(captions).argmax(dim=-1).max()) + 1
    assert trimmed.text_encodings.shape[1] == longest < full.text_encodings.shape[1]
    torch.testing.assert_close(trimmed.text_embed, full.text_embed, rtol=1e-5, atol=1e-6)
    # every caption's own embed, alone in its batch (trimmed to itself), is the same as in the mixed batch
    for i, caption in enumerate(captions):
        torch.testing.assert_close(tiny_clip.embed_text([caption], trim_padding=True).text_embed[0], full.text_embed[i],
                                   rtol=1e-5, atol=1e-6)


def test_architecture_configs_are_read_without_open_clip_as_open_clip_reads_them():
    import subprocess
    import sys

    import open_clip

    from dalle2.clip import register_model_configs
    from dalle2.clip_spec import clip_input_spec, clip_model_config

    register_model_configs()
    for name in open_clip.list_models():
        assert clip_model_config(name) == open_clip.get_model_config(name), name
    assert clip_input_spec("ViT-B-32")[0] == 224 and clip_input_spec("tiny-clip")[0] == 32
    with pytest.raises(ValueError, match="unknown CLIP model 'no-such-clip'"):
        clip_model_config("no-such-clip")
    # a driver planning the embed stage imports neither open_clip nor torch
    code = ("import sys; from dalle2.clip_spec import clip_input_spec, clip_model_config; clip_input_spec('ViT-B-32'); "
            "clip_model_config('tiny-clip'); print(sorted({'torch', 'open_clip'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_a_text_tower_that_pools_otherwise_than_at_the_end_token_is_refused(tmp_path):
    import json

    import open_clip

    config = json.loads((Path(__file__).parents[1] / "dalle2" / "model_configs" / "clip" / "tiny-clip.json").read_text())
    config["text_cfg"].update(pool_type="eos", eos_id=2)  # as MetaCLIP 2's worldwide models (an HF tokenizer's EOS)
    (tmp_path / "tiny-eos-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path))
    with pytest.raises(NotImplementedError, match="tiny-eos-clip: its text tower pools by 'eos'"):
        ClipAdapter("tiny-eos-clip").embed_text(["a red square"])


def test_a_coca_text_tower_is_refused_not_embedded_at_the_wrong_token(tmp_path):
    import json

    import open_clip

    tiny = json.loads((Path(__file__).parents[1] / "dalle2" / "model_configs" / "clip" / "tiny-clip.json").read_text())
    coca = {"embed_dim": 64, "custom_text": True,
            "vision_cfg": {**tiny["vision_cfg"], "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
            "text_cfg": {**tiny["text_cfg"], "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                               "attn_pooler_heads": 2}}
    (tmp_path / "tiny-coca.json").write_text(json.dumps(coca))
    open_clip.add_model_config(str(tmp_path))
    with pytest.raises(NotImplementedError, match="tiny-coca: its text tower pools a CLS token it appends"):
        ClipAdapter("tiny-coca").embed_text(["a red square"])


@pytest.mark.parametrize("name, reason", [("ViT-B-16-SigLIP", "pools by 'last'"), ("coca_ViT-B-32", "CLS token"),
                                          ("roberta-ViT-B-32", "Hugging Face model (roberta-base)"),
                                          ("ViT-B-32", None), ("tiny-clip", None)])
def test_text_towers_the_embed_stage_cannot_read_are_known_from_the_config(name, reason):
    found = text_tower_unsupported(name)
    assert found is None if reason is None else reason in found


class Payload:
    """What a hostile weights file carries: building it would create the file `touched`."""

    def __init__(self, touched):
        self.touched = touched

    def __reduce__(self):
        return (Path.touch, (Path(self.touched),))


def test_pretrained_weights_from_a_local_file_or_an_s3_url_never_unpickled(tmp_path, s3_server, monkeypatch):
    """Air-gapped clusters and mirrors: embed.clip.pretrained may be a weights file on disk or any fsspec URL (fetched
    once into the local cache); a pickle holding more than tensors is refused before open_clip sees it."""
    import fsspec
    from safetensors.torch import save_file

    monkeypatch.setenv("DALLE2_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(7)
    source = ClipAdapter("tiny-clip")
    weights = {k: v.clone().contiguous() for k, v in source.model.state_dict().items()}
    save_file(weights, str(tmp_path / "clip.safetensors"))
    torch.save(weights, tmp_path / "clip.pt")
    bucket = s3_server()
    fsspec.filesystem("s3").put(str(tmp_path / "clip.safetensors"), f"{bucket.removeprefix('s3://')}/w/clip.safetensors")
    text = ["a red circle"]
    for pretrained in (str(tmp_path / "clip.safetensors"), str(tmp_path / "clip.pt"), f"{bucket}/w/clip.safetensors"):
        torch.manual_seed(99)  # another random init: only the file's weights can make the outputs equal
        loaded = ClipAdapter("tiny-clip", pretrained=pretrained)
        torch.testing.assert_close(loaded.embed_text(text).text_embed, source.embed_text(text).text_embed)
    assert len(list((tmp_path / "cache" / "clip").iterdir())) == 1  # the URL's one cached copy
    # other weights of the same size put at the same URL (a fine-tuned CLIP) are fetched again, not served stale
    torch.manual_seed(8)
    other = ClipAdapter("tiny-clip")
    save_file({k: v.clone().contiguous() for k, v in other.model.state_dict().items()}, str(tmp_path / "other.safetensors"))
    assert (tmp_path / "other.safetensors").stat().st_size == (tmp_path / "clip.safetensors").stat().st_size
    fsspec.filesystem("s3").put(str(tmp_path / "other.safetensors"), f"{bucket.removeprefix('s3://')}/w/clip.safetensors")
    loaded = ClipAdapter("tiny-clip", pretrained=f"{bucket}/w/clip.safetensors")
    torch.testing.assert_close(loaded.embed_text(text).text_embed, other.embed_text(text).text_embed)

    hostile = tmp_path / "hostile.pt"
    torch.save({**weights, "hook": Payload(tmp_path / "pwned")}, hostile)
    with pytest.raises(ValueError, match=r"hostile\.pt.*refused \(never unpickled\): .*GLOBAL"):
        ClipAdapter("tiny-clip", pretrained=str(hostile))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(FileNotFoundError, match=r"CLIP pretrained weights .*absent\.safetensors.*no such file"):
        ClipAdapter("tiny-clip", pretrained=str(tmp_path / "absent.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"absent\.pt.*not found"):
        ClipAdapter("tiny-clip", pretrained=f"{bucket}/w/absent.pt")
