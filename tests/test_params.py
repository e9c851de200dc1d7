import pytest
from pydantic import ValidationError

from pipeline.params import MAX_SEED, GenerationParams, describe_errors, field_errors

# wan/configs/shared_config.py `sample_neg_prompt` of the official Wan2.1 release, retyped here so the
# test fails if the copy in pipeline/params.py drifts.
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def test_defaults_are_the_official_ones():
    params = GenerationParams(prompt="a red fox in snow")
    assert params.sample_shift == 8.0
    assert params.sample_guide_scale == 6.0
    assert params.sample_steps == 50
    assert params.frame_num == 81
    assert params.size == "832*480"
    assert (params.width, params.height) == (832, 480)
    assert params.seed == -1


@pytest.mark.parametrize(
    ("given", "normalised"), [("832x480", "832*480"), (" 480X832 ", "480*832"), ("624×624", "624*624")]
)
def test_size_accepts_x_and_normalises_to_star(given, normalised):
    assert GenerationParams(prompt="p", size=given).size == normalised


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("size", "800*600", "one of 832*480, 480*832, 624*624, 704*544, 544*704"),
        ("frame_num", 80, "4n+1 from 5 to 121"),
        ("sample_steps", 0, "from 1 to 100"),
        ("sample_shift", -1, "above 0 and at most 20"),
        ("sample_shift", 0, "above 0 and at most 20"),
        ("sample_shift", 21, "above 0 and at most 20"),
        ("prompt", "   ", "non-blank string of at most 2000 characters"),
        ("prompt", "x" * 2001, "non-blank string of at most 2000 characters"),
        ("seed", -2, f"-1 (draw one) or an integer from 0 to {MAX_SEED}"),
    ],
    ids=["size", "frame_num", "steps", "shift-neg", "shift-zero", "shift-big", "blank", "long", "seed"],
)
def test_invalid_value_is_rejected_naming_field_and_allowed_range(field, value, allowed):
    fields = {"prompt": "a red fox in snow", field: value}
    with pytest.raises(ValidationError) as caught:
        GenerationParams(**fields)
    assert [error["field"] for error in field_errors(caught.value)] == [field]
    message = describe_errors(caught.value)
    assert message.startswith(f"{field}: ")
    assert allowed in message.partition("; allowed: ")[2]


def test_empty_negative_prompt_means_the_official_default():
    for blank in ("", "  \n"):
        assert GenerationParams(prompt="p", negative_prompt=blank).effective_negative_prompt == OFFICIAL_NEGATIVE_PROMPT
    assert GenerationParams(prompt="p", negative_prompt="blurry").effective_negative_prompt == "blurry"


def test_with_seed_draws_only_for_minus_one():
    unseeded = GenerationParams(prompt="p")
    drawn = unseeded.with_seed()
    assert 0 <= drawn.seed <= MAX_SEED
    assert unseeded.seed == -1  # a copy: the request itself still says "draw one"
    assert drawn.model_dump(exclude={"seed"}) == unseeded.model_dump(exclude={"seed"})
    assert drawn.with_seed().seed == drawn.seed
    assert GenerationParams(prompt="p", seed=0).with_seed().seed == 0
