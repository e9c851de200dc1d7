"""What the Ray Serve graph costs on top of the pipeline: one video in-process vs. through HTTP.

    python bench/cpu_overhead.py                         # 624*624, 9 frames, 4 steps, 5 runs each
    python bench/cpu_overhead.py --repeats 2 --sample-steps 1 --out /tmp   # checks the script

Direct: PromptEncoder.encode + VideoModel.generate + write_mp4 in this process. Graph: POST
/v1/videos/sync to configs/tiny.yaml's app (proxy -> gateway -> encoder -> generator -> job store ->
file response), on a Ray cluster this script starts. Same demo model, parameters and seed; runs
interleaved (the order flips every round, so drift on a shared machine hits both alike); medians.
Both sides get the same torch thread count: Ray would otherwise give a fractional-CPU replica one.
Writes bench/results/cpu-overhead-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["HF_HUB_OFFLINE"] = "1"  # the demo model needs no download; never reach for one

import diffusers  # noqa: E402
import httpx  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402

from deployments.app import AppArgs, build  # noqa: E402
from pipeline.generator import VideoModel  # noqa: E402
from pipeline.loading import ModelSource, default_text_dtype, load_text_encoder, resolve_model_source  # noqa: E402
from pipeline.params import GenerationParams  # noqa: E402
from pipeline.text import PromptEncoder  # noqa: E402
from pipeline.video import write_mp4  # noqa: E402

APP = "overhead"
# The work both paths do; the rest of a graph run is plumbing (HTTP, queue, job store, file response).
WORK_PHASES = ("text_encode", "denoise", "decode", "mp4_write")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="a red fox running through fresh snow, cinematic")
    parser.add_argument("--size", default="624*624")
    parser.add_argument("--frame-num", type=int, default=9)
    parser.add_argument("--sample-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path, after one warm-up each")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, for both paths")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args()


class Direct:
    """The pipeline called in-process, as `python -m pipeline` does, with the replicas' devices and dtypes."""

    def __init__(self, source: ModelSource, folder: Path):
        cpu = torch.device("cpu")
        tokenizer, encoder = load_text_encoder(source, cpu, default_text_dtype(source))
        self.prompts = PromptEncoder(tokenizer, encoder, cpu)
        self.model = VideoModel.load(source, cpu)
        self.folder = folder

    def run(self, params: GenerationParams) -> tuple[float, dict, bytes]:
        started = time.perf_counter()
        context, negative_context = self.prompts.encode([params.prompt, params.effective_negative_prompt])
        encoded = time.perf_counter()
        result = self.model.generate(params, context, negative_context)
        written = time.perf_counter()
        path = write_mp4(result.frames, self.folder / "direct.mp4")
        done = time.perf_counter()
        phases = {"text_encode": encoded - started, **result.timings, "mp4_write": done - written}
        return done - started, phases, path.read_bytes()


class Graph:
    """configs/tiny.yaml's app on a fresh local Ray cluster, called over HTTP like any client."""

    def __init__(self, threads: int, cache: Path, output_dir: Path):
        env = {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "WAN_T2V_CACHE": str(cache)}
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        (app,) = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["applications"]
        args = AppArgs(**{**app["args"], "output_dir": str(output_dir)})
        serve.run(build(args), name=APP, route_prefix=f"/{APP}")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}/{APP}", timeout=600)
        self.args = args.model_dump(mode="json")

    def run(self, body: dict) -> tuple[float, dict, bytes]:
        started = time.perf_counter()
        response = self.client.post("/v1/videos/sync", json=body)
        seconds = time.perf_counter() - started
        response.raise_for_status()
        return seconds, json.loads(response.headers["x-video-job"])["timings"], response.content

    def close(self) -> None:
        self.client.close()
        serve.shutdown()
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine(threads: int) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    return {
        "device": "cpu",
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
    }


def summarise(runs: list[tuple[float, dict, bytes]]) -> dict:
    return {
        "seconds": [round(seconds, 4) for seconds, _, _ in runs],
        "median_s": round(statistics.median(seconds for seconds, _, _ in runs), 4),
        "median_phases_s": {name: round(statistics.median(phases[name] for _, phases, _ in runs), 4) for name in runs[0][1]},
        "median_outside_work_s": round(statistics.median(seconds - sum(phases[name] for name in WORK_PHASES) for seconds, phases, _ in runs), 4),
    }


def markdown(results: dict) -> str:
    env, p, direct, graph = results["machine"], results["parameters"], results["direct"], results["graph"]
    phases = sorted(set(direct["median_phases_s"]) | set(graph["median_phases_s"]))
    lines = [
        f"# CPU overhead of the Ray Serve graph — {env['cpu_model']}, {results['date']}",
        "",
        f"Demo model; {p['size']}, {p['frame_num']} frames, {p['sample_steps']} steps, seed {p['seed']}; "
        f"{results['repeats']} interleaved runs per path after a warm-up, medians; {env['torch_threads']} torch threads "
        f"on {env['cpu_count']} cores (load average {env['load_average_at_start'][0]:.1f} at start); "
        f"torch {env['versions']['torch']}, ray {env['versions']['ray']}. "
        f"Same MP4 from both paths: {results['same_video']}.",
        "",
        "| path | median s | runs s |",
        "| --- | --- | --- |",
        f"| direct (encode + generate + write_mp4, in-process) | {direct['median_s']} | {', '.join(map(str, direct['seconds']))} |",
        f"| graph (POST /v1/videos/sync, configs/tiny.yaml) | {graph['median_s']} | {', '.join(map(str, graph['seconds']))} |",
        "",
        f"**Overhead: {results['overhead_s']} s per video, ratio graph/direct {results['ratio']}.** "
        f"Of a graph run, {graph['median_outside_work_s']} s (median) lies outside the work phases below: "
        "HTTP, queue, job store and file response; the rest of the difference is the same work running slower "
        "in a replica process (median phases).",
        "",
        "| phase, median s | direct | graph (job timings) |",
        "| --- | --- | --- |",
        *(f"| {name} | {direct['median_phases_s'].get(name, '')} | {graph['median_phases_s'].get(name, '')} |" for name in phases),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    options = parse_args()
    torch.set_num_threads(options.threads)
    params = GenerationParams(prompt=options.prompt, size=options.size, frame_num=options.frame_num,
                              sample_steps=options.sample_steps, seed=options.seed)
    body = {name: getattr(params, name) for name in ("prompt", "size", "frame_num", "sample_steps", "seed")}
    work = Path(tempfile.mkdtemp(prefix="cpu-overhead-"))
    source = resolve_model_source("demo", allow_demo=True, cache_dir=work / "cache")
    about = machine(options.threads)
    direct, graph = Direct(source, work), Graph(options.threads, work / "cache", work / "outputs")
    try:
        timed = {"direct": [], "graph": []}
        paths = {"direct": lambda: direct.run(params), "graph": lambda: graph.run(body)}
        for name in paths:  # warm-up: first-call costs (connections, lazy init) are not overhead
            paths[name]()
        for round_ in range(options.repeats):
            for name in (("direct", "graph") if round_ % 2 == 0 else ("graph", "direct")):
                timed[name].append(paths[name]())
                print(f"{name} {round_ + 1}/{options.repeats}: {timed[name][-1][0]:.2f}s", flush=True)
    finally:
        graph.close()
        shutil.rmtree(work, ignore_errors=True)

    results = {
        "benchmark": "cpu_overhead",
        "date": dt.date.today().isoformat(),
        "machine": about,
        "parameters": body,
        "repeats": options.repeats,
        "app_args": graph.args,
        "direct": summarise(timed["direct"]),
        "graph": summarise(timed["graph"]),
        "same_video": len({hashlib.sha256(mp4).hexdigest() for runs in timed.values() for _, _, mp4 in runs}) == 1,
    }
    results["overhead_s"] = round(results["graph"]["median_s"] - results["direct"]["median_s"], 4)
    results["ratio"] = round(results["graph"]["median_s"] / results["direct"]["median_s"], 4)
    options.out.mkdir(parents=True, exist_ok=True)
    stem = options.out / f"cpu-overhead-{results['date']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
