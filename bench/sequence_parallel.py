"""One video on several GPUs, measured as users run it: `serve run` with `generator.parallel`, videos over HTTP.

For each layout that fits this host's GPUs, one after the other in one run, from the repo root:

    WAN_CKPT_DIR=/tmp/wan13b python bench/sequence_parallel.py [--layouts one_gpu,team_of_1,...]

a layout's YAML is configs/single_gpu.yaml with `generator.parallel` (and gpus_per_replica) set;
`serve run` starts it, /readyz says ready, then `--videos` sync videos of the same request (832*480,
81 frames, 50 steps, guidance 6, one seed) run one after the other, and the service stops. A
layout's time is its last video's (the first after a start can still meet cold caches); each ratio
is against `one_gpu` (the 1-GPU fast path) measured in the same run, and each layout's first video
is compared, decoded, with one_gpu's (sequence parallelism changes only bf16 rounding).
`two_replicas` instead runs 2 one-GPU replicas and sends `--videos` × 2 jobs at once: videos per hour.

Layouts: one_gpu (no team), team_of_1 (a team of one rank: the split code path, hooks, attention op
and NCCL, on one GPU), cfg2, ulysses2, cfg2_ulysses2, ulysses4, cfg2_ulysses4, ring8, two_replicas.
Writes `--out/sequence-parallel-<device slug>-<date>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml

from service_gpu import HTTP_TIMEOUT, PROMPT, device_name, end_leftovers, launch, log, stop_service, versions, wait_ready

from pipeline.parallel import ParallelLayout
from pipeline.video import read_mp4

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS: dict[str, dict | None] = {
    "one_gpu": None,
    "team_of_1": {"ulysses": 1},
    "cfg2": {"cfg": 2},
    "ulysses2": {"ulysses": 2},
    "cfg2_ulysses2": {"cfg": 2, "ulysses": 2},
    "ulysses4": {"ulysses": 4},
    "cfg2_ulysses4": {"cfg": 2, "ulysses": 4},
    "ring8": {"ring": 8},
    "two_replicas": None,
}
# The targets, seconds for one video by GPUs used (bench/RESULTS.md; issue #19).
TARGET_S = {2: 24.0, 4: 14.0, 8: 8.0}
TWO_REPLICAS_TARGET = 1.9  # videos per hour, two replicas / one


def world_size(layout: str) -> int:
    if layout == "two_replicas":
        return 2
    return ParallelLayout(**(LAYOUTS[layout] or {})).world_size


def layout_config(layout: str, base: Path, folder: Path) -> Path:
    config = yaml.safe_load(base.read_text())
    (app,) = config["applications"]
    generator = app["args"]["generator"]
    if layout == "two_replicas":
        generator["num_replicas"] = 2
    elif LAYOUTS[layout] is not None:
        generator.update(parallel=LAYOUTS[layout], gpus_per_replica=world_size(layout), num_cpus=1)
    path = folder / f"{layout}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def request(args: argparse.Namespace) -> dict:
    return {"prompt": PROMPT, "size": args.size, "frame_num": args.frame_num, "sample_steps": args.steps,
            "sample_guide_scale": 6.0, "seed": 1234}


def sync_video(url: str, body: dict, path: Path) -> dict:
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/videos/sync", json=body, timeout=HTTP_TIMEOUT)
    wall_s = time.monotonic() - started
    response.raise_for_status()
    path.write_bytes(response.content)
    job = json.loads(response.headers["x-video-job"])
    return {"wall_s": round(wall_s, 3), "timings": job.get("timings", {}), "peak_gpu_gib": job.get("peak_gpu_gib"),
            "video": str(path)}


def compare_frames(path: str, reference: str) -> dict:
    got, _ = read_mp4(path)
    expected, _ = read_mp4(reference)
    difference = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    mse = float((difference.astype(np.float64) ** 2).mean())
    return {"max_abs": int(difference.max()), "mean_abs": round(float(difference.mean()), 4),
            "psnr_db": None if mse == 0 else round(10 * np.log10(255**2 / mse), 2)}


def run_layout(args: argparse.Namespace, layout: str, folder: Path) -> dict:
    config = layout_config(layout, args.base_config, folder)
    run_args = argparse.Namespace(config=config, work=args.work)
    end_leftovers(args.work / "service-pids.json")
    run = launch(run_args, layout)
    record: dict = {"world_size": world_size(layout), "parallel": LAYOUTS[layout], "config": str(config)}
    try:
        ready_s, readyz = wait_ready(run, args.ready_timeout)
        record["ready_s"] = round(ready_s, 2)
        record["generator"] = readyz["stages"]["video_generator"]
        log(f"{layout}: ready after {ready_s:.1f} s")
        body = request(args)
        if layout == "two_replicas":
            started = time.monotonic()
            jobs = args.videos * 2
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                record["videos"] = list(pool.map(lambda n: sync_video(run.url, body, folder / f"{layout}-{n}.mp4"), range(jobs)))
            record["videos_per_hour"] = round(jobs / (time.monotonic() - started) * 3600, 2)
        else:
            record["videos"] = []
            for n in range(args.videos):
                record["videos"].append(sync_video(run.url, body, folder / f"{layout}-{n}.mp4"))
                log(f"{layout}: video {n + 1} in {record['videos'][-1]['wall_s']} s")
            record["video_s"] = record["videos"][-1]["wall_s"]
    except Exception as error:  # noqa: BLE001 - one layout's failure is its result; the next still runs
        record["error"] = f"{type(error).__name__}: {error}"[:1000]
        log(f"{layout}: failed: {record['error']}")
    finally:
        record["stop"] = stop_service(run)
        record["serve_log"] = str(run.log_path)
    return record


def summarize(results: dict) -> None:
    layouts = results["layouts"]
    base = layouts.get("one_gpu", {})
    for name, record in layouts.items():
        if name != "one_gpu" and record.get("videos") and base.get("videos"):
            record["frames_vs_one_gpu"] = compare_frames(record["videos"][0]["video"], base["videos"][0]["video"])
        if "video_s" in record and "video_s" in base:
            record["time_vs_one_gpu"] = round(record["video_s"] / base["video_s"], 4)
            target = TARGET_S.get(record["world_size"])
            record["target_s"] = target
            record["target_met"] = None if target is None else record["video_s"] <= target
        if name == "two_replicas" and "videos_per_hour" in record and "video_s" in base:
            record["throughput_vs_one_gpu"] = round(record["videos_per_hour"] / (3600 / base["video_s"]), 3)
            record["target_met"] = record["throughput_vs_one_gpu"] >= TWO_REPLICAS_TARGET


def markdown(results: dict) -> str:
    lines = [f"# Sequence parallelism through `serve run`, {results['device']} × {results['gpus']}, {results['date']}", "",
             f"{results['request']['size']}, {results['request']['frame_num']} frames, {results['request']['sample_steps']} steps, "
             f"guidance 6; one video's time is the last of {results['videos_per_layout']} sync videos after /readyz.", "",
             "| layout | GPUs | ready s | video s | / one GPU | target | frames vs one GPU (max, mean abs) | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, record in results["layouts"].items():
        frames = record.get("frames_vs_one_gpu")
        seconds = record.get("video_s", record.get("videos_per_hour") and f"{record['videos_per_hour']} videos/h")
        ratio = record.get("time_vs_one_gpu", record.get("throughput_vs_one_gpu"))
        target = {True: "met", False: "missed", None: "—"}[record.get("target_met")]
        frames_cell = f"{frames['max_abs']}, {frames['mean_abs']}" if frames else "—"
        lines.append(f"| {name} | {record['world_size']} | {record.get('ready_s', '—')} | {seconds or '—'} | {ratio or '—'} | {target} | "
                     f"{frames_cell} | {record.get('error', '')[:120]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="auto", help="comma-separated names, or auto: every layout this host's GPUs fit")
    parser.add_argument("--base-config", type=Path, default=ROOT / "configs" / "single_gpu.yaml")
    parser.add_argument("--size", default="832*480")
    parser.add_argument("--frame-num", type=int, default=81)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--ready-timeout", type=float, default=420)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wan-sp-bench"))
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    names = [name for name in LAYOUTS if world_size(name) <= gpus] if args.layouts == "auto" else args.layouts.split(",")
    folder = args.work / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True)
    slug = re.sub(r"[^a-z0-9]+", "-", (device_name() or "cpu").lower()).strip("-")
    json_path = args.out / f"sequence-parallel-{slug}-{datetime.date.today().isoformat()}.json"
    results = {"device": device_name(), "gpus": gpus, "date": datetime.date.today().isoformat(), "versions": versions(),
               "request": request(args), "videos_per_layout": args.videos, "layouts": {},
               "not_run": {name: f"needs {world_size(name)} GPUs" for name in LAYOUTS if name not in names}}
    for name in names:
        log(f"layout {name} ({world_size(name)} GPUs)")
        results["layouts"][name] = run_layout(args, name, folder)
        summarize(results)
        json_path.write_text(json.dumps(results, indent=1))
        json_path.with_suffix(".md").write_text(markdown(results))
    print(json_path.with_suffix(".md").read_text(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
