"""Every test in tests/gpu is skipped, with the reason, where CUDA is absent; GPU memory goes back after each module."""

from pathlib import Path

import pytest
import torch

from .helpers import free_gpu_memory, prompt_embeddings

HERE = Path(__file__).parent
NO_CUDA = pytest.mark.skipif(True, reason="needs a CUDA GPU: run on the GPU machine, see tests/gpu/README.md")


def pytest_collection_modifyitems(config, items):
    """This hook sees the whole session's items, so it marks only those under tests/gpu; the mark goes
    first, so that a CPU machine reports this reason rather than a test's own (FA3, WAN_CKPT_DIR)."""
    if torch.cuda.is_available():
        return
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(NO_CUDA, append=False)


@pytest.fixture(scope="module", autouse=True)
def release_gpu_memory():
    """Each module builds full-size models: free them, and the compiled graphs that refer to them, before the next."""
    yield
    torch._dynamo.reset()
    free_gpu_memory()


@pytest.fixture(scope="session")
def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative prompt) real-token embeddings on the CPU, the same in every test."""
    return prompt_embeddings()
