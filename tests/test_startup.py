"""A replica says ready only once its first job will be as fast as a later one, and /readyz says what it did."""

import time

from video_jobs import CHEAP


def test_readyz_reports_each_replicas_start_and_the_negative_prompt_is_already_cached(tiny_app):
    with tiny_app.client() as client:
        stages = client.get("/readyz").json()["stages"]
        encoder, generator = stages["text_encoder_cpu"], stages["video_generator"]
        assert {"load", "touch_weights", "encode_warm_texts", "probe_40_tokens"} <= set(encoder["startup"]["phases"])
        assert {"import", "load_dit", "load_vae", "place"} <= set(generator["startup"]["phases"])
        for stage in (encoder, generator):  # wall clock, so a launcher can line it up with its own log
            assert abs(stage["startup"]["started_at"] - time.time()) < 3600
        assert encoder["startup"]["seconds"] >= max(encoder["startup"]["phases"].values())
        assert (encoder["cache_hits"], encoder["cache_misses"]) == (0, 1)  # the default negative prompt, before any job

        response = client.post("/v1/videos/sync", json={"prompt": "the first job of this replica", **CHEAP})
        assert response.status_code == 200, response.text
        encoder = client.get("/readyz").json()["stages"]["text_encoder_cpu"]
        assert (encoder["cache_hits"], encoder["cache_misses"]) == (1, 2)  # its negative prompt came from the cache
