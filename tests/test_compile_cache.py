"""The persistent compile cache: a second process with the same key compiles nothing, a new key starts afresh."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.generator import VideoModel
from pipeline.params import GenerationParams

ROOT = Path(__file__).resolve().parents[1]
PARAMS = GenerationParams(prompt="a red fox in snow", size="624*624", frame_num=5, sample_steps=1, seed=3)

# A fresh process, as a replica start is: compile the demo model with the cache, warm it, report.
START = """
import json, sys
import torch
from torch._dynamo.utils import counters
from pipeline.generator import VideoModel
from pipeline.loading import resolve_model_source
from pipeline.params import GenerationParams
from pipeline.startup import StartupPhases

source = resolve_model_source("demo", allow_demo=True, cache_dir=sys.argv[1])
model = VideoModel.load(source, torch.device("cpu"))
phases = StartupPhases()
model.compile(GenerationParams(prompt="warm-up", size="624*624", frame_num=5), cache_root=sys.argv[2], phases=phases)
print(json.dumps({"phases": phases.phases, "key": model.compile_cache_key(GenerationParams(prompt="-", size="624*624", frame_num=5)),
                  "fx_hits": counters["inductor"]["fxgraph_cache_hit"], "fx_misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def start(models: Path, cache: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", START, str(models), str(cache)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_second_start_loads_what_the_first_compiled(demo_source, tmp_path):
    models = demo_source.folder.parent
    first = start(models, tmp_path / "cache")
    assert first["fx_misses"] > 0 and "compile_cache_save" in first["phases"]
    folder = tmp_path / "cache" / first["key"]
    assert (folder / "artifacts.bin").stat().st_size > 0 and any((folder / "inductor").iterdir())

    second = start(models, tmp_path / "cache")
    assert second["key"] == first["key"]
    assert second["fx_misses"] == 0 and second["fx_hits"] > 0  # every graph came from the cache
    assert "compile_cache_save" not in second["phases"]  # nothing new to keep


def test_the_key_changes_with_the_warmed_shape_and_the_model(demo_source):
    model = VideoModel.load(demo_source, torch.device("cpu"))
    key = model.compile_cache_key(PARAMS)
    assert key == model.compile_cache_key(PARAMS.model_copy(update={"prompt": "another prompt", "seed": 9}))
    assert key != model.compile_cache_key(PARAMS.model_copy(update={"frame_num": 9}))
    model.models.transformer.register_to_config(num_layers=3)  # as a different checkpoint's config would say
    assert key != model.compile_cache_key(PARAMS)
