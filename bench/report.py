"""Write the README's performance table and bench/RESULTS.md from the result files in bench/results/.

Usage: python bench/report.py [--check]

bench/results/manifest.json names the current result files, what each measures and the README
rows each feeds. This script writes
  - README.md between `<!-- perf-table:start -->` and `<!-- perf-table:end -->`: the current code
    only, one row per path, each ratio taken against a baseline measured in the same run;
  - bench/RESULTS.md: every result file, current and archived (bench/results/archive/), with its
    date, device, what it measured and its headline figures: the history.
A result file that no manifest entry names, outside archive/, is reported: move it into archive/
(`git mv`) and describe it under the manifest's `archived`, or add a `current` entry for it.
--check writes nothing and exits 1 when either file is out of date or a result file is unaccounted for.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
ARCHIVE = RESULTS / "archive"
MANIFEST = RESULTS / "manifest.json"
README = ROOT / "README.md"
HISTORY = BENCH / "RESULTS.md"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
SUPERSCRIPT = " ¹²³⁴⁵⁶⁷⁸⁹"
COMPANION_SUFFIXES = (".md", "-smi.csv")  # written beside a result file by bench/gpu.py and bench/profile_gpu.py


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def section(run: dict, dotted: str) -> dict:
    for key in dotted.split("."):
        run = run[key]
    return run


def end_to_end(part: dict) -> float:
    """Prompt -> MP4 file where the run recorded it, else generation + MP4 write (no text encode)."""
    return part.get("end_to_end_s") or part["generate_s"] + part.get("mp4_write_s", 0)


def rel(path: Path) -> str:
    return path.relative_to(RESULTS).as_posix()


# -- the README's table ---------------------------------------------------------------------------


def service_row(run: dict) -> dict:
    """The soak's completed videos against the same session's direct fast path at its steady step time."""
    soak, direct = run["soak"], run["direct"]["fast"]
    done = [job for job in soak["jobs"] if job["status"] == "completed"]
    served = statistics.median(job["served_s"] for job in done)
    steady = direct["steps"] * direct["per_step_s"] + direct["decode_s"] + direct["mp4_write_after_decode_s"]
    first, rest = done[0]["served_s"], statistics.median(job["served_s"] for job in done[1:])
    ready = [start["ready_s"] for start in run["starts"] if start.get("ready_s")]
    statuses = soak["http"]["statuses"]
    return {
        "per_step_s": statistics.median(job["timings"]["denoise"] / job["steps"] for job in done),
        "end_to_end_s": served,
        "ratio": served / steady,
        "peak_gib": max(job["peak_gpu_memory_bytes"] for job in done) / 2**30,
        "facts": (
            f"{len(done)} videos; first video {first / rest:.3f}× the median of the rest; "
            f"{soak['http']['failed_requests']} failed of {sum(statuses.values())} requests; "
            f"/readyz 200 after {min(ready):.0f} s at best (a later start), "
            f"{max(ready):.0f} s on a machine's first start, which compiles"
        ),
    }


def reference_vs_diffusers() -> str:
    """The range of reference / diffusers over every run (current or archived) that measured both."""
    ratios = []
    for path in sorted(RESULTS.rglob("*.json")):
        run = load(path) if path != MANIFEST else {}
        if isinstance(run.get("diffusers"), dict) and isinstance(run.get("resident"), dict):
            if "generate_s" in run["diffusers"] and "generate_s" in run["resident"]:
                ratios.append(end_to_end(run["resident"]) / end_to_end(run["diffusers"]))
    return f"{min(ratios):.2f}-{max(ratios):.2f}×"


def table(manifest: dict) -> str:
    lines = [
        f"One row per path, from the newest run that measured it; each ratio against a baseline of the same "
        f"run on the same card. Workload: {manifest['workload']}.",
        "",
        "| path | card | s/step | prompt → MP4, s | same-run ratio | peak GPU GiB | result file (`bench/results/`) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for entry in manifest["current"]:
        if not entry["rows"]:
            continue
        run = load(RESULTS / entry["file"])
        for row in entry["rows"]:
            if row.get("kind") == "service":
                figures = service_row(run)
                part, ratio = figures, f"{figures['ratio']:.3f}× {row['baseline_name']}"
            else:
                part, baseline = section(run, row["section"]), section(run, row["baseline"])
                ratio = f"{end_to_end(part) / end_to_end(baseline):.2f}× {row['baseline_name']}"
                if "also" in row:
                    other = section(run, row["also"]["section"])
                    ratio += f", {end_to_end(part) / end_to_end(other):.2f}× its {row['also']['name']}"
            note = row.get("note", "").format(reference_vs_diffusers=reference_vs_diffusers())
            if row.get("kind") == "service":
                note += f" {part['facts']}."
            mark = ""
            if note:
                notes.append(note)
                mark = SUPERSCRIPT[len(notes)]
            lines.append(
                f"| {row['path']}{mark} | {row['card']} | {part['per_step_s']:.3f} | {end_to_end(part):.2f} | {ratio} "
                f"| {part['peak_gib']:.2f} | `{entry['file']}` |"
            )
    for n, note in enumerate(notes, 1):
        lines += ["", f"{SUPERSCRIPT[n]} {note}"]
    return "\n".join(lines)


# -- bench/RESULTS.md -----------------------------------------------------------------------------

SKIP = {"workload", "machine", "app_args", "versions", "host", "files", "parameters", "kernels", "variant", "starts",
        "targets", "planned", "by_client", "serve_log", "gpu_memory", "shapes", "ops", "top_kernels_ms"}


def fmt(value: float) -> str:
    return f"{value:.4g}"


def leaf_figure(name: str, part: dict) -> str | None:
    """A section's headline: its time (and step time, peak memory, distance to the reference) or its error."""
    if "error" in part and isinstance(part["error"], str):
        return f"{name}: failed ({part['error'][:80]})"
    bits = []
    if "generate_s" in part:
        bits.append(f"{fmt(end_to_end(part))} s")
        if "per_step_s" in part:
            bits.append(f"{fmt(part['per_step_s'])} s/step")
    else:
        for key, unit in (("forward_s", "s/forward"), ("decode_s", "s"), ("step_s", "s/step"), ("ms", "ms"),
                          ("sustained_tflops", "TFLOP/s sustained"), ("median_s", "s median"), ("seconds", "s")):
            value = part.get(key)
            if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                value = statistics.median(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                bits.append(f"{fmt(value)} {unit}")
                break
        if "s" in part and not bits:
            value = part["s"]
            value = statistics.median(value) if isinstance(value, list) else value
            bits.append(f"{fmt(value)} s")
    if not bits:
        return None
    if "peak_gib" in part:
        bits.append(f"{part['peak_gib']} GiB")
    if "psnr_db_vs_fp32" in part:
        bits.append(f"{part['psnr_db_vs_fp32']} dB PSNR against fp32")
    error = part.get("latents_rel_error_vs_reference")
    if isinstance(error, (int, float)):
        bits.append(f"latents {error * 100:.2f} % from the reference")
    return f"{name} {bits[0]}" + (f" ({', '.join(bits[1:])})" if bits[1:] else "")


def walk(run: dict, prefix: str = "") -> list[str]:
    figures = []
    for key, value in run.items():
        if key in SKIP or not isinstance(value, dict):
            continue
        name = f"{prefix}{key}"
        figure = leaf_figure(name, value)
        if figure:
            figures.append(figure)
        else:
            figures += walk(value, f"{name}.")
    return figures


def headline(path: Path) -> str:
    run = load(path)
    if "soak" in run and "jobs" in run["soak"]:
        figures = service_row(run)
        return (f"median served {figures['end_to_end_s']:.2f} s, {figures['ratio']:.3f}× the direct fast path's steady "
                f"steps; {figures['facts']}")
    if "soak" in run:  # a soak that did not run its jobs: its start only
        ready = ", ".join(f"{start['ready_s']:.1f} s" for start in run.get("starts", []) if start.get("ready_s"))
        return f"/readyz 200 after {ready}; soak: {run['soak'].get('error', 'no jobs')}"
    if run.get("benchmark") == "cpu_overhead":
        return (f"in-process {run['direct']['median_s']} s, through the graph {run['graph']['median_s']} s per video "
                f"(median): +{run['overhead_s']} s, {run['ratio']}×")
    if "parts" in run:  # bench/load_original.py
        return "; ".join(
            f"{name} cold {times['cold']['seconds']} s (peak RSS {times['cold']['peak_rss_bytes'] / 1e9:.1f} GB), "
            f"warm {times['warm']['seconds']} s"
            for name, times in run["parts"].items()
        )
    if "layouts" in run:  # bench/sequence_parallel.py
        return "; ".join(
            f"{name} ({record['world_size']} GPU) " + (f"{record['video_s']} s, {record.get('time_vs_one_gpu', 1.0)}× one GPU"
                                                        if "video_s" in record else record.get("error", "no video"))
            for name, record in run["layouts"].items()
        ) + (f"; not run: {', '.join(run['not_run'])}" if run.get("not_run") else "")
    if all(key.isdigit() for key in run):  # encoder threads
        return "; ".join(f"{threads} threads {statistics.median(t['seconds']):.2f} s" for threads, t in run.items())
    figures = walk(run)
    text = run.get("text", {})
    if "cpu_default_40_tokens_s" in text:
        figures.append(f"umT5 40 tokens: CPU {text['cpu_default_40_tokens_s']} s, GPU {text.get('gpu_40_tokens_s')} s")
    return "; ".join(figures) or "—"


def companions(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    stem = path.with_suffix("")
    return [Path(f"{stem}{suffix}") for suffix in COMPANION_SUFFIXES if Path(f"{stem}{suffix}").exists()]


def describe(path: Path, what: str, device: str | None = None, date: str | None = None, rows: str = "") -> list[str]:
    run = load(path) if path.suffix == ".json" else {}
    device = device or run.get("device") or run.get("host", {}).get("gpu") or "—"
    match = re.search(r"\d{4}-\d{2}-\d{2}", path.name)
    date = date or run.get("date") or (match.group(0) if match else "—")
    others = [f"`{p.name}`" for p in companions(path) if p != path]
    title = f"### `{rel(path)}`" + (f" (with {', '.join(others)})" if others and len(others) <= 3 else "")
    lines = [title, "", f"{date} · {device}" + (f" · README rows: {rows}" if rows else ""), "", what]
    if path.suffix == ".json":
        lines += ["", f"Figures: {headline(path)}."]
    elif others:
        lines += ["", f"Files: {', '.join(others)}."]
    return lines + [""]


def history(manifest: dict) -> str:
    out = [
        "# Benchmark results",
        "",
        "Written by `python bench/report.py` from `bench/results/manifest.json` and the result files; do not",
        "edit by hand. The README's performance table shows the current code only; this page lists every",
        "result file: the current ones in the manifest's order (those feeding the README's rows first), then",
        f"the archive, oldest first. Workload unless a file says otherwise: {manifest['workload']}.",
        "Each file's `.md` companion (where there is one) has its full tables; figures here are end-to-end",
        "seconds (prompt → MP4 file where the run encoded the prompt) unless marked.",
        "",
        "## Current",
        "",
    ]
    for entry in manifest["current"]:
        rows = ", ".join(row["path"] for row in entry["rows"])
        out += describe(RESULTS / entry["file"], f"**{entry['label']}.** {entry['measures']}", entry.get("device"),
                        entry.get("date"), rows)
    out += ["## Archive (superseded)", "",
            "Files in `bench/results/archive/`: earlier code, repeats on other cards, profiles behind decisions.", ""]
    archived = sorted(ARCHIVE.rglob("*.json"), key=lambda p: (re.search(r"\d{4}-\d{2}-\d{2}", rel(p)).group(0), rel(p)))
    for path in archived:
        what = manifest["archived"].get(path.name) or load(path).get("note") or "(no description)"
        out += describe(path, what)
    return "\n".join(out).rstrip() + "\n"


def unaccounted(manifest: dict) -> list[str]:
    """Result files that neither a current entry (with its companions and folder) nor the archive holds."""
    known = {MANIFEST}
    for entry in manifest["current"]:
        path = RESULTS / entry["file"]
        if not path.exists():
            raise SystemExit(f"manifest names {entry['file']}, which is not in bench/results/")
        known |= {path, *companions(path)}
        if path.parent != RESULTS:  # a folder of evidence: everything in it is current
            known |= set(companions(path.parent))
    for path in ARCHIVE.rglob("*.json"):
        if path.name not in manifest["archived"] and "note" not in load(path):
            print(f"warning: archived {rel(path)} has no description in manifest.json", file=sys.stderr)
    return sorted(rel(p) for p in RESULTS.rglob("*") if p.is_file() and p not in known and ARCHIVE not in p.parents)


def main() -> int:
    check = "--check" in sys.argv[1:]
    manifest = load(MANIFEST)
    readme = README.read_text()
    head, _, rest = readme.partition(START)
    if START not in readme or END not in rest:
        raise SystemExit(f"README.md lacks the {START} ... {END} markers")
    _, _, tail = rest.partition(END)
    new_readme = f"{head}{START}\n{table(manifest)}\n{END}{tail}"
    new_history = history(manifest)
    stray = unaccounted(manifest)
    for name in stray:
        print(f"not in the manifest: bench/results/{name} (git mv it into bench/results/archive/ or add an entry)",
              file=sys.stderr)
    stale = [path.name for path, text in ((README, new_readme), (HISTORY, new_history))
             if not path.exists() or path.read_text() != text]
    if check:
        for name in stale:
            print(f"{name} is out of date: run python bench/report.py", file=sys.stderr)
        return 1 if stale or stray else 0
    README.write_text(new_readme)
    HISTORY.write_text(new_history)
    print(f"wrote README.md's performance table and {HISTORY.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
