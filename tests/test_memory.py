import pytest
import torch

from pipeline import demo
from pipeline.memory import MemoryPolicy, PlacedModels

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_offload_flag_maps_to_a_policy():
    assert MemoryPolicy.from_offload_flag(True) is MemoryPolicy.OFFLOAD
    assert MemoryPolicy.from_offload_flag(False) is MemoryPolicy.RESIDENT


def parameter_devices(*models):
    return {parameter.device for model in models for parameter in model.parameters()}


@pytest.mark.parametrize("policy", list(MemoryPolicy))
def test_on_a_cpu_every_policy_keeps_everything_on_the_cpu(policy):
    transformer, vae = demo.build_transformer(), demo.build_vae()
    placed = PlacedModels(transformer, vae, CPU, policy)
    assert parameter_devices(transformer, vae) == {CPU}
    with placed.denoising():
        assert parameter_devices(transformer) == {CPU}
    assert placed.describe() == {"policy": policy.value, "device": "cpu", "vae_tiled": False}


class Recorder:
    """Stands in for the DiT or VAE on a machine without CUDA: records placement and enabled hooks."""

    def __init__(self):
        self.device = CPU
        self.use_tiling = False
        self.group_offload: dict | None = None

    def to(self, device):
        self.device = torch.device(device)
        return self

    def enable_group_offload(self, **options):
        self.group_offload = options

    def enable_tiling(self):
        self.use_tiling = True


@pytest.fixture
def empty_cache_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    return calls


def place_on_cuda(policy):
    return PlacedModels(Recorder(), Recorder(), CUDA, policy)


@pytest.mark.parametrize(
    ("policy", "at_rest", "while_denoising", "cache_releases"),
    [
        (MemoryPolicy.RESIDENT, CUDA, CUDA, 0),
        (MemoryPolicy.OFFLOAD, CPU, CUDA, 1),  # the freed DiT memory is handed back for the VAE decode
        (MemoryPolicy.STREAM, CPU, CPU, 0),  # its blocks stream in; the module itself never moves
    ],
)
def test_where_the_dit_lives_around_denoising(empty_cache_calls, policy, at_rest, while_denoising, cache_releases):
    placed = place_on_cuda(policy)
    assert placed.vae.device == CUDA
    assert placed.transformer.device == at_rest
    with placed.denoising():
        assert placed.transformer.device == while_denoising
    assert placed.transformer.device == at_rest
    assert len(empty_cache_calls) == cache_releases
    assert placed.describe()["policy"] == policy.value
    assert placed.describe()["device"] == "cuda"


def test_offload_returns_the_dit_to_the_cpu_when_denoising_fails(empty_cache_calls):
    placed = place_on_cuda(MemoryPolicy.OFFLOAD)
    with pytest.raises(RuntimeError), placed.denoising():
        raise RuntimeError("a failed denoise")
    assert placed.transformer.device == CPU


def test_stream_group_offloads_the_dit_by_block_and_tiles_the_vae():
    placed = place_on_cuda(MemoryPolicy.STREAM)
    options = placed.transformer.group_offload
    assert options["offload_type"] == "block_level"
    assert options["use_stream"] is True
    assert (options["onload_device"], options["offload_device"]) == (CUDA, CPU)
    assert placed.describe()["vae_tiled"] is True


@pytest.mark.parametrize("policy", [MemoryPolicy.RESIDENT, MemoryPolicy.OFFLOAD])
def test_only_stream_installs_hooks(policy):
    placed = place_on_cuda(policy)
    assert placed.transformer.group_offload is None
    assert placed.describe()["vae_tiled"] is False
