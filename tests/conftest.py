import os

# Tests never reach the Hugging Face hub; set before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from pipeline.loading import resolve_model_source  # noqa: E402


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory):
    """The built-in demo checkpoint, written once per test session into a temporary cache."""
    return resolve_model_source("demo", allow_demo=True, cache_dir=tmp_path_factory.mktemp("models"))
