from pathlib import Path

import pytest
import torch

from pipeline import demo
from pipeline.loading import ModelSource, default_text_dtype
from pipeline.text import MAX_TEXT_TOKENS, PromptEncoder, clean_text, pad_context
from conftest import count_forward_calls

PROMPTS = [
    "a red fox in snow",
    "A cinematic shot of waves crashing on black volcanic rocks at sunset, slow motion, 4k",
]


@pytest.fixture(scope="module")
def tokenizer():
    return demo.build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return demo.build_text_encoder(len(tokenizer))


@pytest.fixture
def forward_calls(model):
    """How many times the umT5 encoder ran during a test."""
    yield from count_forward_calls(model)


def make_encoder(tokenizer, model, cache_size=256):
    return PromptEncoder(tokenizer, model, torch.device("cpu"), cache_size=cache_size)


@torch.inference_mode()
def official_encoding(tokenizer, model, text):
    """The official way: pad to 512 tokens, run with the mask, trim the output to the real tokens."""
    tokens = tokenizer(
        [clean_text(text)], padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt"
    )
    hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden[0, : int(tokens.attention_mask.sum())]


@pytest.mark.parametrize("text", PROMPTS)
def test_trimmed_encoding_equals_the_official_padded_one(tokenizer, model, text):
    expected = official_encoding(tokenizer, model, text)
    (encoded,) = make_encoder(tokenizer, model).encode([text])
    assert encoded.shape == expected.shape
    assert torch.allclose(encoded, expected, atol=1e-5, rtol=0)


def test_a_batch_of_different_lengths_equals_one_by_one(tokenizer, model):
    batched = make_encoder(tokenizer, model).encode(PROMPTS)
    one_by_one = [make_encoder(tokenizer, model).encode([text])[0] for text in PROMPTS]
    assert batched[0].shape[0] < batched[1].shape[0]
    for got, expected in zip(batched, one_by_one):
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("fish &amp; chips", "fish & chips"),
        ("fish &amp;amp; chips", "fish & chips"),  # unescaped twice, as the official cleaner does
        ("  a red\n\tfox   in snow  ", "a red fox in snow"),
        ("The fox doesnÃ¢â‚¬â„¢t blink", "The fox doesn't blink"),  # ftfy repairs mojibake
        ("cafÃ©", "café"),
    ],
)
def test_clean_text(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_repeated_text_is_encoded_once(tokenizer, model, forward_calls):
    encoder = make_encoder(tokenizer, model)
    first = encoder.encode(["a red fox"])[0]
    again = encoder.encode(["  a red   fox "])[0]  # the same text once cleaned
    assert torch.equal(first, again)
    assert (encoder.cache_misses, encoder.cache_hits) == (1, 1)
    assert len(forward_calls) == 1


def test_cache_evicts_the_least_recently_used_text(tokenizer, model, forward_calls):
    encoder = make_encoder(tokenizer, model, cache_size=2)
    encoder.encode(["a"])
    encoder.encode(["b"])
    encoder.encode(["a"])  # "a" is now the most recently used
    encoder.encode(["c"])  # evicts "b"
    assert len(forward_calls) == 3
    encoder.encode(["a"])
    assert len(forward_calls) == 3
    encoder.encode(["b"])
    assert len(forward_calls) == 4
    assert (encoder.cache_misses, encoder.cache_hits) == (4, 2)


def test_pad_context_zero_pads_to_512():
    embeds = torch.randn(7, demo.TEXT_DIM)
    padded = pad_context(embeds)
    assert padded.shape == (MAX_TEXT_TOKENS, demo.TEXT_DIM)
    assert torch.equal(padded[:7], embeds)
    assert not padded[7:].any()


def test_text_dtype_is_bfloat16_only_for_real_checkpoints(demo_source):
    real = ModelSource(Path("Wan2.1-T2V-1.3B"), "original", "Wan2.1-T2V-1.3B", "path", False)
    assert default_text_dtype(demo_source) == torch.float32
    assert default_text_dtype(real) == torch.bfloat16


def test_touch_weights_spans_every_weight_and_changes_none(tokenizer, model):
    encoder = make_encoder(tokenizer, model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    spanned = encoder.touch_weights()
    assert spanned == sum(tensor.numel() * tensor.element_size() for tensor in (*model.parameters(), *model.buffers()))
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_the_probe_times_one_uncached_pass_of_that_many_tokens(tokenizer, model, forward_calls):
    encoder = make_encoder(tokenizer, model)
    assert encoder.probe_seconds(40) > 0
    assert len(forward_calls) == 1 and (encoder.cache_hits, encoder.cache_misses) == (0, 0)
