"""LoRA adapters on the tiny DiT: stock and rearranged layouts agree, formats agree, bad files fail by name."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline.demo import build_transformer
from pipeline.dit import rearrange_blocks, text_context
from pipeline.lora import LoraMismatchError, ServedAdapters, load_lora_state_dict

RANK = 4
# diffusers module name -> the original Wan checkpoint's name for the same Linear
WAN_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
             "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "ffn.net.0.proj": "ffn.0",
             "ffn.net.2": "ffn.2"}


@pytest.fixture(scope="module")
def base():
    """The tiny DiT with every parameter perturbed: ones and zeros would hide a missed permutation."""
    torch.manual_seed(0)
    model = build_transformer()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


@pytest.fixture(scope="module")
def inputs(base):
    generator = torch.Generator().manual_seed(2)
    return {"hidden_states": torch.randn(1, 16, 3, 8, 8, generator=generator), "timestep": torch.tensor([700.0]),
            "embeds": torch.randn(7, base.config.text_dim, generator=generator)}


def run(transformer, inputs):
    with torch.inference_mode():
        return transformer(hidden_states=inputs["hidden_states"], timestep=inputs["timestep"], return_dict=False,
                           encoder_hidden_states=text_context(inputs["embeds"]))[0]


def random_adapter(model, seed, wan_format=False):
    """Random lora_A/lora_B (large enough to move the output) on every listed Linear of every block."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for index, block in enumerate(model.blocks):
        for module_name, wan_name in WAN_NAMES.items():
            linear = block.get_submodule(module_name)
            prefix = f"diffusion_model.blocks.{index}.{wan_name}" if wan_format else f"transformer.blocks.{index}.{module_name}"
            state_dict[f"{prefix}.lora_A.weight"] = torch.randn(RANK, linear.in_features, generator=generator) * 0.3
            state_dict[f"{prefix}.lora_B.weight"] = torch.randn(linear.out_features, RANK, generator=generator) * 0.3
    return state_dict


def saved(state_dict, path):
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def as_wan_format(state_dict, comfy=False):
    """The original Wan checkpoint's key names; `comfy`: ComfyUI's lora_down/lora_up with an alpha of
    twice the rank, which scales the delta by 2 (the caller doubles the PEFT file's lora_A to match)."""
    reverse = {v: k for k, v in WAN_NAMES.items()}
    converted = {}
    for key, tensor in state_dict.items():
        _, _, index, *rest = key.split(".")  # transformer.blocks.N.<module>.lora_X.weight
        module_name, kind = ".".join(rest[:-2]), rest[-2]
        prefix = f"diffusion_model.blocks.{index}.{next(w for w, m in reverse.items() if m == module_name)}"
        if comfy:
            kind = {"lora_A": "lora_down", "lora_B": "lora_up"}[kind]
            converted[f"{prefix}.alpha"] = torch.tensor(2.0 * RANK)
        converted[f"{prefix}.{kind}.weight"] = tensor
    return converted


def with_adapters(model, rearranged, **paths):
    """A copy of `model` (rearranged or stock) serving the adapters at `paths`, by name."""
    model = copy.deepcopy(model)
    if rearranged:
        rearrange_blocks(model)
    served = ServedAdapters(model, {name: load_lora_state_dict(path) for name, path in paths.items()}, paths)
    return model, served


def test_adapter_changes_the_output_and_scale_zero_or_none_gives_the_base_exactly(base, inputs, tmp_path):
    path = saved(random_adapter(base, 3), tmp_path / "style.safetensors")
    plain = copy.deepcopy(base)
    rearrange_blocks(plain)
    expected = run(plain, inputs)
    model, served = with_adapters(base, rearranged=True, style=path)
    assert torch.equal(run(model, inputs), expected)  # loaded but not chosen: the base weights
    served.use("style", 1.0)
    adapted = run(model, inputs)
    assert (adapted - expected).abs().max() > 0.05 * expected.abs().max()
    served.use("style", 0.0)
    assert torch.equal(run(model, inputs), expected)
    served.use(None)
    assert torch.equal(run(model, inputs), expected)
    served.use("style", 1.0)
    assert torch.equal(run(model, inputs), adapted)  # no reload: the same weights come back
    with pytest.raises(KeyError, match="no LoRA adapter named 'other'"):
        served.use("other", 1.0)


def test_switching_changes_weights_in_place_and_nothing_else(base, tmp_path):
    """What compiled blocks guard on never changes: the same modules, the same parameter tensors at the
    same addresses (merged into in place), no hooks. So a switch cannot recompile."""
    plain = copy.deepcopy(base)
    rearrange_blocks(plain)
    model, served = with_adapters(base, rearranged=True, first=saved(random_adapter(base, 10), tmp_path / "a.safetensors"),
                                  second=saved(random_adapter(base, 11), tmp_path / "b.safetensors"))

    def state():
        return ([(name, type(module)) for name, module in model.named_modules()],
                [(name, id(p), p.data_ptr()) for name, p in model.named_parameters()],
                [len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules()])

    before = state()
    assert before[0] == [(name, type(module)) for name, module in plain.named_modules()]  # no LoRA layers injected
    for name, scale in (("first", 1.0), ("second", 0.3), (None, 1.0), ("first", 2.0)):
        served.use(name, scale)
        assert state() == before
    served.use(None)
    for (name, got), expected in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(got, expected), name  # the base weights restored exactly


def test_rearranged_dit_with_an_adapter_matches_diffusers_stock_dit_with_it(base, inputs, tmp_path):
    path = saved(random_adapter(base, 4), tmp_path / "style.safetensors")
    (stock, stock_served), (rearranged, served) = with_adapters(base, False, style=path), with_adapters(base, True, style=path)
    stock_served.use("style", 0.7)
    served.use("style", 0.7)
    expected, got = run(stock, inputs), run(rearranged, inputs)
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()
    # Without the row permutation the adapter's query/key delta lands on the wrong rows.
    for module in served.bank["style"]:
        if module.endswith(("attn1.to_q", "attn1.to_k")):
            served.bank["style"][module] = stock_served.bank["style"][module]
    served.use(None)
    served.use("style", 0.7)
    assert (run(rearranged, inputs) - expected).abs().max() > 1e-3 * expected.abs().max()


def test_adapter_equals_its_weights_merged_by_hand(base, inputs, tmp_path):
    state_dict = random_adapter(base, 5)
    scale = 0.6
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for key, up in state_dict.items():
            if key.endswith("lora_B.weight"):
                down = state_dict[key.replace("lora_B", "lora_A")]
                merged.get_submodule(key.removeprefix("transformer.").removesuffix(".lora_B.weight")).weight += scale * up @ down
    rearrange_blocks(merged)
    model, served = with_adapters(base, rearranged=True, style=saved(state_dict, tmp_path / "style.safetensors"))
    served.use("style", scale)
    expected, got = run(merged, inputs), run(model, inputs)
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


def test_alpha_from_the_peft_config_scales_the_adapter(base, inputs, tmp_path):
    """PEFT's save_pretrained keeps lora_alpha in adapter_config.json: alpha = 2 r doubles the delta."""
    state_dict = random_adapter(base, 12)
    folder = tmp_path / "peft_style"
    folder.mkdir()
    saved(state_dict, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 2 * RANK}))
    doubled = saved({k: v * 2 if "lora_B" in k else v for k, v in state_dict.items()}, tmp_path / "doubled.safetensors")
    model, served = with_adapters(base, rearranged=True, alpha=folder, doubled=doubled)
    outputs = []
    for name in ("alpha", "doubled"):
        served.use(name, 1.0)
        outputs.append(run(model, inputs))
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5 * outputs[1].abs().max()


@pytest.mark.parametrize("comfy", [False, True], ids=["wan_lora_A_B", "comfy_down_up_alpha"])
def test_wan_format_file_loads_to_the_same_output_as_the_peft_format_one(base, inputs, tmp_path, comfy):
    state_dict = random_adapter(base, 6)
    wan_path = saved(as_wan_format(state_dict, comfy=comfy), tmp_path / "comfy_style.safetensors")
    if comfy:
        state_dict = {k: v * 2 if "lora_A" in k else v for k, v in state_dict.items()}
    folder = tmp_path / "peft_style"
    folder.mkdir()
    saved(state_dict, folder / "pytorch_lora_weights.safetensors")
    assert set(load_lora_state_dict(wan_path)[0]) == set(load_lora_state_dict(folder)[0])
    model, served = with_adapters(base, rearranged=True, peft=folder, wan=wan_path)
    outputs = []
    for name in ("peft", "wan"):
        served.use(name, 1.0)
        outputs.append(run(model, inputs))
    assert torch.equal(outputs[0], outputs[1])
    served.use(None)
    assert not torch.equal(outputs[0], run(model, inputs))  # really applied


def test_adapters_of_different_ranks_and_layers_each_give_what_they_give_alone(base, inputs, tmp_path):
    """Switching from an adapter on every layer to one on fewer layers restores the layers only the first touched.
    The second adapter also comes as PEFT writes it (no `transformer.` prefix)."""
    first = random_adapter(base, 7)
    second = {k.removeprefix("transformer."): v[: RANK // 2] if "lora_A" in k else v[:, : RANK // 2]
              for k, v in random_adapter(base, 8).items() if "ffn" not in k}
    paths = {"first": saved(first, tmp_path / "first.safetensors"), "second": saved(second, tmp_path / "second.safetensors")}
    both, served = with_adapters(base, rearranged=True, **paths)
    for name, path in paths.items():
        alone, alone_served = with_adapters(base, rearranged=True, **{name: path})
        alone_served.use(name, 0.5)
        served.use(name, 0.5)
        assert (run(both, inputs) - run(alone, inputs)).abs().max() < 1e-6 * run(alone, inputs).abs().max(), name


def test_keys_that_do_not_match_the_model_are_an_error_naming_the_file_and_key(base, tmp_path):
    state_dict = random_adapter(base, 9)
    state_dict["transformer.blocks.0.attn1.to_qq.lora_A.weight"] = torch.zeros(RANK, 32)
    path = saved(state_dict, tmp_path / "wrong.safetensors")
    with pytest.raises(LoraMismatchError, match=r"wrong\.safetensors.*blocks\.0\.attn1\.to_qq\.lora_A\.weight"):
        with_adapters(base, rearranged=True, style=path)
    # A right name with the wrong width (an adapter for another model size) is refused the same way.
    state_dict = random_adapter(base, 9)
    state_dict["transformer.blocks.1.ffn.net.2.lora_B.weight"] = torch.zeros(99, RANK)
    path = saved(state_dict, tmp_path / "other_size.safetensors")
    with pytest.raises(LoraMismatchError, match=r"other_size\.safetensors.*blocks\.1\.ffn\.net\.2\.lora_B\.weight \(99, 4\)"):
        with_adapters(base, rearranged=True, style=path)
    wan = as_wan_format(random_adapter(base, 9))
    wan["diffusion_model.blocks.0.self_attn.unknown.lora_A.weight"] = torch.zeros(RANK, 32)
    path = saved(wan, tmp_path / "wan_wrong.safetensors")
    with pytest.raises(LoraMismatchError, match=r"wan_wrong\.safetensors.*self_attn\.unknown"):
        load_lora_state_dict(path)
