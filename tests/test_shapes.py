"""The built-in data set: withheld combinations never drawn, and a reader of colour, shape and position that
tells every combination apart on drawn, JPEG-compressed and blurred images."""

import io
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from jobs.config_io import ConfigError, load_config
from jobs.demo import prompt_match
from jobs.run_config import RunConfig
from jobs.shapes import all_specs, describe, draw, generate, spec_of


def degrade(image: Image.Image, how: str) -> Image.Image:
    if how == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=75)
        return Image.open(buffer).convert("RGB")
    return image.filter(ImageFilter.GaussianBlur(0.8)) if how == "blur" else image


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("how", ["plain", "jpeg", "blur"])
def test_describe_reads_every_combination_back(size, how):
    rng = random.Random(size)
    for spec in all_specs():
        for _ in range(3):
            image = degrade(draw(spec, size, jitter=0.08, rng=rng), how)
            assert describe(np.asarray(image)) == (spec.color, spec.shape, spec.position), (spec, how)


def test_an_empty_image_describes_as_nothing():
    assert describe(np.full((32, 32, 3), 245, np.uint8)) == (None, None, None)


def test_withheld_captions_are_never_drawn_and_the_rest_stay_balanced():
    withheld = ["a red square on the right", "a blue circle in the center"]
    captions = Counter(spec.caption for spec, _ in generate(52 * 3, size=32, withhold=withheld))
    assert not set(withheld) & set(captions)
    assert len(captions) == len(all_specs()) - 2 and set(captions.values()) == {3}


def test_prompt_match_counts_each_attribute_and_all_three():
    rng = random.Random(0)
    prompts = ["a red circle on the left", "a blue square on the right"]
    drawn = [draw(spec_of(p), 32, rng=rng) for p in prompts]
    wrong_shape = draw(spec_of("a red triangle on the left"), 32, rng=rng)
    wrong_place = draw(spec_of("a blue square in the center"), 32, rng=rng)
    arrays = np.stack([np.asarray(x) for x in (drawn[0], wrong_shape, drawn[1], wrong_place)])
    match = prompt_match(arrays, prompts, per_prompt=2)
    assert (match["color_match"], match["shape_match"], match["position_match"]) == (1.0, 0.75, 0.75)
    assert (match["both_match"], match["all_match"]) == (0.75, 0.5)
    # chance follows the palette drawn: 1 of 6 colours and 54 triples, or of 5 and 45 for the benchmark's grid
    assert (match["chance_color"], match["chance_all"]) == pytest.approx((1 / 6, 1 / 54))
    five = prompt_match(arrays, prompts, per_prompt=2, colors=["red", "green", "blue", "yellow", "purple"])
    assert (five["chance_color"], five["chance_all"]) == pytest.approx((1 / 5, 1 / 45))


def test_the_demo_config_refuses_a_caption_it_cannot_draw():
    with pytest.raises(ConfigError, match="demo.withhold.*'a pink star on the left' is not a built-in caption"):
        load_config(RunConfig, overrides=["demo.withhold=['a pink star on the left']"])
    with pytest.raises(ConfigError, match="demo.images"):
        load_config(RunConfig, overrides=["demo.images=10"])
    config = load_config(RunConfig, overrides=["demo.withhold=['a red square on the right']"])
    assert config.demo.withhold == ["a red square on the right"]


def test_a_palette_subset_draws_and_prompts_only_its_colours():
    from jobs.shapes import seen_prompts

    five = ["red", "green", "blue", "yellow", "purple"]
    specs = [spec for spec, _ in generate(45 * 2, size=32, colors=five, withhold=["a red square on the left"])]
    assert {s.color for s in specs} == set(five) and len({s.caption for s in specs}) == 44
    config = load_config(RunConfig, overrides=[f"demo.colors=[{','.join(five)}]",
                                               "demo.withhold=['a red circle on the left']"])
    prompts = seen_prompts(config.demo.withhold, config.demo.colors)
    assert "an orange triangle on the left" not in prompts
    assert "a red circle on the left" not in prompts and len(prompts) == 4
    with pytest.raises(ConfigError, match="demo.colors.*pink"):
        load_config(RunConfig, overrides=["demo.colors=[red,pink]"])
    with pytest.raises(ConfigError, match="withhold.*outside demo.colors"):
        load_config(RunConfig, overrides=["demo.colors=[red,blue]", "demo.withhold=['an orange square on the left']"])
    with pytest.raises(ConfigError, match="demo.colors.*each once"):
        load_config(RunConfig, overrides=["demo.colors=[red,red,blue]"])
    # red and blue leave two of the demo's prompts; withholding both leaves none to sample and score
    with pytest.raises(ConfigError, match="none of the demo's prompts"):
        load_config(RunConfig, overrides=["demo.colors=[red,blue]", "demo.withhold=['a red circle on the left', "
                                                                    "'a blue square on the right']"])
