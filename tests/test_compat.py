"""Each private API the compat modules wrap, checked against the installed torch, diffusers and Ray (CPU, Ray not started).

One row per wrapped symbol: its check uses the symbol as our code does and tests what we rely on,
so a library upgrade that drops or changes it fails here, naming the symbol and the versions its
compat module was written for.
"""

from __future__ import annotations

import contextvars
import importlib.metadata
import inspect
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

from deployments import serve_compat
from pipeline import demo, diffusers_compat, torch_compat

COMPAT = {"torch": torch_compat, "diffusers": diffusers_compat, "ray": serve_compat}  # library -> its compat module


@dataclass(frozen=True)
class Wrapped:
    library: str
    symbol: str
    check: Callable[[], None]


def fresh_double() -> Callable[[torch.Tensor], torch.Tensor]:
    """x * 2 with a code object of its own: Dynamo keeps compiled code and recompile counts per code object."""
    def double(x):
        return x * 2

    return types.FunctionType(double.__code__.replace(), double.__globals__)


def compile_count(shapes) -> int:
    """How many graphs Dynamo compiles for `fresh_double` called on [2, n] tensors, n in `shapes`."""
    graphs = []

    def counting_backend(graph, _example_inputs):
        graphs.append(graph)
        return graph.forward

    double = torch.compile(fresh_double(), backend=counting_backend, dynamic=False)
    for columns in shapes:
        x = torch.ones(2, columns)
        assert torch.equal(double(x), x * 2)
    return len(graphs)


# --- torch ------------------------------------------------------------------------------------------


def check_addmm_activation():
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((5, 8), (12, 8), (12,)))
    # The CPU kernel applies the erf GELU (CUDA's epilogue is the tanh form, checked in tests/gpu).
    torch.testing.assert_close(torch_compat.addmm_gelu(bias, x, weight.t()), F.gelu(torch.addmm(bias, x, weight.t())))



def check_recompile_limit():
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch({name: 2}):
        torch_compat.raise_recompile_limit(4)
        assert compile_count(range(2, 8)) == 4  # a static graph per shape, up to the limit


def check_inductor_config():
    import torch._inductor.config as inductor_config

    before = inductor_config.coordinate_descent_tuning
    replaced = torch_compat.set_inductor_options({"coordinate_descent_tuning": not before})
    try:
        assert replaced == {"coordinate_descent_tuning": before}
        assert inductor_config.coordinate_descent_tuning is (not before)
    finally:
        torch_compat.set_inductor_options(replaced)


# --- diffusers --------------------------------------------------------------------------------------


def tiny_transformer_inputs(transformer) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 16, 1, 4, 4, generator=generator), "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(1, 6, transformer.config.text_dim, generator=generator), "return_dict": False}


@torch.no_grad()
def check_vae_feature_cache():
    vae = demo.build_vae()
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = vae.decode(latents).sample
    vae.clear_cache()
    after_quant_conv = vae.post_quant_conv(latents)
    frames = [diffusers_compat.decode_latent_frame(vae, after_quant_conv, i) for i in range(latents.shape[2])]
    vae.clear_cache()
    assert torch.equal(torch.cat(frames, dim=2).clamp(-1, 1), expected)


@torch.no_grad()
def check_causal_padding():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    conv = WanCausalConv3d(2, 3, kernel_size=3, padding=(1, 1, 0))  # (time, height, width)
    assert diffusers_compat.causal_padding(conv) == (0, 0, 1, 1, 2, 0)  # F.pad's order: w, h, then time before only
    x = torch.randn(1, 2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(F.conv3d(F.pad(x, diffusers_compat.causal_padding(conv)), conv.weight, conv.bias), conv(x))


def check_float32_module_names():
    from diffusers import WanTransformer3DModel

    names = diffusers_compat.float32_module_names(demo.build_transformer())
    assert names == list(WanTransformer3DModel._keep_in_fp32_modules), names
    assert names, "diffusers no longer keeps any Wan DiT module in float32: the release loader's cast must change with it"
    model = WanTransformer3DModel.from_config(demo.build_transformer().config).to(torch.bfloat16)
    kept = [name for name, parameter in model.named_parameters() if parameter.dtype == torch.float32]
    assert all(any(module in name.split(".") for module in names) for name in kept), kept


def check_flash3_hand_off():
    from diffusers.models import attention_dispatch

    assert diffusers_compat.FLASH3_BACKEND in attention_dispatch._AttentionBackendRegistry.list_backends()
    # diffusers' FA3 op calls the module's global by this name, so the function we set there is the one run.
    assert re.search(r"\bflash_attn_3_func\(", inspect.getsource(attention_dispatch))

    def ours(**_):
        raise AssertionError("not called here")

    with patch.object(attention_dispatch, "flash_attn_3_func", None):
        diffusers_compat.provide_flash3_function(ours)
        assert attention_dispatch.flash_attn_3_func is ours
        diffusers_compat.provide_flash3_function(print)  # a function diffusers already has stays
        assert attention_dispatch.flash_attn_3_func is ours


@torch.no_grad()
def check_processor_backend():
    from diffusers.models.transformers import transformer_wan

    transformer = demo.build_transformer()
    diffusers_compat.set_processor_backends(transformer, diffusers_compat.NATIVE_BACKEND)
    processors = [block.attn1.processor for block in transformer.blocks] + [block.attn2.processor for block in transformer.blocks]
    assert {diffusers_compat.attention_backend_of(p) for p in processors} == {diffusers_compat.NATIVE_BACKEND}
    with patch.object(transformer_wan, "dispatch_attention_fn", wraps=transformer_wan.dispatch_attention_fn) as dispatch:
        transformer(**tiny_transformer_inputs(transformer))
    assert [call.kwargs["backend"] for call in dispatch.call_args_list] == [diffusers_compat.NATIVE_BACKEND] * len(processors)


def check_replace_processor():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    attention = demo.build_transformer().blocks[0].attn1
    diffusers_compat.set_processor_backends(attention, diffusers_compat.FLASH3_BACKEND)  # labels only: nothing runs
    attention.processor._parallel_config = parallel_config = object()
    replacement = WanAttnProcessor()
    diffusers_compat.replace_processor(attention, replacement)
    assert attention.processor is replacement
    assert diffusers_compat.attention_backend_of(replacement) is diffusers_compat.FLASH3_BACKEND
    assert replacement._parallel_config is parallel_config


def check_swap_class():
    from pipeline.dit import GeluInEpilogue
    from pipeline.vae import CausalConv3dPaddedInKernel, UpsampleInInputDtype

    # The classes our replacements extend are still the ones the Wan models are built from.
    modules = [*demo.build_vae().modules(), *demo.build_transformer().modules()]
    for replacement in (CausalConv3dPaddedInKernel, UpsampleInInputDtype, GeluInEpilogue):
        found = [m for m in modules if type(m) is replacement.__base__]
        assert found, f"no {replacement.__base__.__qualname__} in the tiny Wan models"
        diffusers_compat.swap_class(found[0], replacement)
        assert type(found[0]) is replacement
    with pytest.raises(TypeError, match=r"GeluInEpilogue replaces diffusers' .*GELU, got torch.nn.modules.linear.Linear"):
        diffusers_compat.swap_class(torch.nn.Linear(2, 2), GeluInEpilogue)


def check_reset_step_cache():
    from diffusers.hooks import HookRegistry, ModelHook

    class CountingResets(ModelHook):
        _is_stateful = True  # diffusers resets only hooks that say they keep state, as its step caches do

        def __init__(self):
            super().__init__()
            self.resets = 0

        def reset_state(self, module):
            self.resets += 1
            return module

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    hook = CountingResets()
    HookRegistry.check_if_exists_or_initialize(model[0]).register_hook(hook, "counting_resets")
    diffusers_compat.reset_step_cache(model)
    assert hook.resets == 1  # a submodule's hook: the reset recurses


# --- Ray Serve --------------------------------------------------------------------------------------


def check_set_request_context():
    from ray.serve import context

    assert "request_id" in inspect.signature(context._set_request_context).parameters

    def request_id_after_setting() -> str:
        serve_compat.set_request_id("job-7")
        return context._get_serve_request_context().request_id

    assert contextvars.copy_context().run(request_id_after_setting) == "job-7"


def check_to_object_ref():
    import ray
    from ray.serve.handle import DeploymentResponse

    method = DeploymentResponse._to_object_ref
    assert inspect.iscoroutinefunction(method)
    signature = inspect.signature(method)
    assert list(signature.parameters) == ["self"]
    assert signature.return_annotation in (ray.ObjectRef, "ray.ObjectRef")


def check_serve_namespace():
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    assert SERVE_NAMESPACE == serve_compat.SERVE_ACTOR_NAMESPACE
    assert list(inspect.signature(ray.get_actor).parameters) == ["name", "namespace"]


WRAPPED = [
    Wrapped("torch", "torch._addmm_activation", check_addmm_activation),
    Wrapped("torch", "torch._dynamo.config.recompile_limit", check_recompile_limit),
    Wrapped("torch", "torch._inductor.config", check_inductor_config),
    Wrapped("diffusers", "AutoencoderKLWan._feat_map/_conv_idx", check_vae_feature_cache),
    Wrapped("diffusers", "WanCausalConv3d._padding", check_causal_padding),
    Wrapped("diffusers", "ModelMixin._keep_in_fp32_modules", check_float32_module_names),
    Wrapped("diffusers", "AttentionBackendName._FLASH_3, attention_dispatch.flash_attn_3_func", check_flash3_hand_off),
    Wrapped("diffusers", "processor._attention_backend", check_processor_backend),
    Wrapped("diffusers", "processor._attention_backend/_parallel_config via set_processor", check_replace_processor),
    Wrapped("diffusers", "module.__class__ of GELU, WanCausalConv3d, WanUpsample", check_swap_class),
    Wrapped("diffusers", "CacheMixin._reset_stateful_cache (as HookRegistry.reset_stateful_hooks)", check_reset_step_cache),
    Wrapped("ray", "ray.serve.context._set_request_context", check_set_request_context),
    Wrapped("ray", "DeploymentResponse._to_object_ref", check_to_object_ref),
    Wrapped("ray", "Serve's actor namespace 'serve'", check_serve_namespace),
]


@pytest.mark.parametrize("wrapped", WRAPPED, ids=lambda wrapped: wrapped.symbol)
def test_wrapped_private_api_still_behaves(wrapped):
    try:
        wrapped.check()
    except Exception as error:  # noqa: BLE001 - any failure means the same: the wrapper needs a look
        compat = COMPAT[wrapped.library]
        pytest.fail(f"{wrapped.symbol} is gone or changed in the installed {wrapped.library} "
                    f"{importlib.metadata.version(wrapped.library)}; {compat.__name__} was written for "
                    f"{compat.SUPPORTED_VERSIONS}: {type(error).__name__}: {error}")


@pytest.mark.parametrize("compat", COMPAT.values(), ids=lambda compat: compat.__name__)
def test_supported_versions_are_the_dependency_pins(compat):
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"{compat.SUPPORTED_VERSIONS}"' in pyproject, \
        f"{compat.__name__} was written for {compat.SUPPORTED_VERSIONS}, not pyproject.toml's pin: check its wrappers, then the range"
