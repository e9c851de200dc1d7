"""Prometheus metrics of the three deployments, through Ray Serve's metrics API.

Ray exports them from each node's metrics agent (`ray start --metrics-export-port`, or
`ray.init(_metrics_export_port=...)`) as `ray_<name>`, counters with a `_total` suffix, tagged
with the application, deployment and replica. Each class is created in the replica that records
its metrics: a Ray metric belongs to the process that made it.
"""

from __future__ import annotations

import time

from ray.serve import metrics

STEP_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]
PHASE_BUCKETS = [0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]
# Job timings keys (see Gateway._run) -> the phase tag.
PHASES = {"queue": "queue", "text_encode": "text_encode", "denoise": "denoise", "decode": "decode", "mp4_write": "write"}


class GatewayMetrics:
    def __init__(self):
        self.jobs = metrics.Counter(
            "wan_t2v_jobs",
            description="Jobs entering a status: queued (accepted), rejected (429, queue full), retried, completed, failed, cancelled.",
            tag_keys=("status",),
        )
        self.pending = metrics.Gauge("wan_t2v_pending_jobs", description="Jobs waiting to run (bounded by max_pending_jobs).")
        self.phase_seconds = metrics.Histogram(
            "wan_t2v_generation_seconds",
            description="Seconds a completed job spent per phase: queue, text_encode, denoise, decode, write.",
            boundaries=PHASE_BUCKETS,
            tag_keys=("phase",),
        )
        self.peak_gpu = metrics.Gauge(
            "wan_t2v_peak_gpu_memory_bytes", description="Peak GPU memory of the last completed job (not set on a CPU generator)."
        )

    def job(self, status: str) -> None:
        self.jobs.inc(tags={"status": status})

    def completed(self, timings: dict[str, float], peak_gpu_bytes: int | None) -> None:
        for key, seconds in timings.items():
            if key in PHASES:
                self.phase_seconds.observe(seconds, tags={"phase": PHASES[key]})
        if peak_gpu_bytes is not None:
            self.peak_gpu.set(peak_gpu_bytes)


class TextEncoderMetrics:
    def __init__(self):
        self.seconds = metrics.Histogram(
            "wan_t2v_text_encode_seconds", description="Seconds to encode one text, a prompt or a negative prompt (cache hits included).", boundaries=PHASE_BUCKETS
        )
        self.hits = metrics.Counter("wan_t2v_prompt_cache_hits", description="Prompts served from the encoder's cache.")
        self.misses = metrics.Counter("wan_t2v_prompt_cache_misses", description="Prompts the encoder had to run.")
        self.reported = (0, 0)

    def encoded(self, seconds: float, cache_hits: int, cache_misses: int) -> None:
        """`cache_hits`/`cache_misses`: the encoder's running totals; the counters get what is new."""
        self.seconds.observe(seconds)
        hits, misses = cache_hits - self.reported[0], cache_misses - self.reported[1]
        if hits:
            self.hits.inc(hits)
        if misses:
            self.misses.inc(misses)
        self.reported = (cache_hits, cache_misses)


class GeneratorMetrics:
    def __init__(self):
        self.step_seconds = metrics.Histogram(
            "wan_t2v_denoise_step_seconds", description="Seconds per denoising step (both guidance branches).", boundaries=STEP_BUCKETS
        )

    def step_timer(self):
        """A progress callback that records each step's time, from the previous step or from step 0 (the start)."""
        last = time.perf_counter()

        def on_progress(phase: str, step: int, total: int) -> None:
            nonlocal last
            if phase == "denoise":
                now = time.perf_counter()
                if step > 0:
                    self.step_seconds.observe(now - last)
                last = now

        return on_progress
