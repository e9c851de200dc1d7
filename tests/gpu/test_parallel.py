"""The sequence-parallel DiT (pipeline/parallel.py) on GPUs, with NCCL, at the real size.

One GPU: a one-rank team runs the production fast path (FA3, compiled blocks with the attention op
inside, fullgraph) through the split code path, hooks, custom op and NCCL group included, and ends
at the unsplit fast path's latents. Two and four GPUs (skipped, with the reason, on smaller hosts):
Ulysses 2, and CFG 2 × Ulysses 2, in one process per GPU, end at the one-GPU latents within the
tolerance test_fast_path.py uses for bf16 rounding.
"""

import copy

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from torch._dynamo.utils import counters

from pipeline.generator import VideoModel
from pipeline.parallel import ParallelLayout, join, leave
from pipeline.params import GenerationParams

from .helpers import DEVICE, build_dit, build_vae, prompt_embeddings, final_latents, relative_error, requires_flash3

pytestmark = requires_flash3

PARAMS = GenerationParams(prompt="a red fox trots through fresh snow", size="832*480", frame_num=17, sample_steps=4, seed=42)
TOLERANCE = 0.03  # as tests/gpu/test_fast_path.py: bf16 rounding carried through 4 guided steps


def free_address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def test_a_one_rank_team_runs_the_compiled_fast_path_to_its_latents(embeddings):
    dit = build_dit()
    fast = VideoModel(copy.deepcopy(dit), build_vae(torch.bfloat16), DEVICE, attention="flash3")
    fast.compile()
    expected = final_latents(fast, PARAMS, embeddings)
    del fast
    split = VideoModel(dit, build_vae(torch.bfloat16), DEVICE, attention="flash3")
    split.split_across(join(ParallelLayout(), 0, free_address(), DEVICE))
    try:
        split.compile()
        graphs = counters["stats"]["unique_graphs"]
        got = final_latents(split, PARAMS, embeddings)
        assert counters["stats"]["unique_graphs"] > graphs, "the split fast path ran no compiled graph"
    finally:
        leave()
    error = relative_error(got, expected)
    assert error < TOLERANCE, f"one-rank team latents differ from the fast path by {error:.2%}"


def rank_latents(rank: int, layout: ParallelLayout, address: str, results) -> None:
    """One process per GPU: the team's generation; rank 0 puts its final latents on `results`."""
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    model = VideoModel(build_dit().to(device), build_vae(torch.bfloat16).to(device), device, attention="flash3")
    model.split_across(join(layout, rank, address, device))
    try:
        if rank == 0:
            results.put(final_latents(model, PARAMS, prompt_embeddings()))
        else:
            model.follow(PARAMS, *prompt_embeddings())
    finally:
        leave()


@pytest.mark.parametrize("layout", [ParallelLayout(ulysses=2), ParallelLayout(cfg=2, ulysses=2)], ids=["ulysses2", "cfg2xulysses2"])
def test_a_team_across_gpus_ends_at_the_one_gpu_latents(layout, embeddings):
    if torch.cuda.device_count() < layout.world_size:
        pytest.skip(f"needs {layout.world_size} GPUs, this host has {torch.cuda.device_count()}")
    expected = final_latents(VideoModel(build_dit(), build_vae(torch.bfloat16), DEVICE, attention="flash3"), PARAMS, embeddings)
    context = mp.get_context("spawn")
    results = context.Queue()
    address = free_address()
    processes = [context.Process(target=rank_latents, args=(rank, layout, address, results)) for rank in range(layout.world_size)]
    for process in processes:
        process.start()
    got = results.get(timeout=600)
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    error = relative_error(got, expected)
    assert error < TOLERANCE, f"{layout} latents differ from one GPU's by {error:.2%}"
