"""Sequence parallelism (pipeline/parallel.py) on gloo ranks that are real Ray actors, and the Serve graph
with `generator.parallel`: the split DiT computes what one process computes, and a team that loses a
worker mid-job gives its job back (run again) and is replaced whole."""

import sys

import pytest
import ray
import torch
from ray import serve

from conftest import deploy, free_port, tiny_args
from pipeline.parallel import ParallelLayout, token_shards
from video_jobs import finished, poll, submit

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the rank actors below run in Ray's workers

SHAPE = (3, 6, 10)  # latent frames, height, width: 3 x 3 x 5 = 45 tokens, which 2 and 4 ranks split unevenly


class TestLayout:
    def test_a_ulysses_degree_must_divide_the_heads(self):
        ParallelLayout(ulysses=4).check_heads(12)
        with pytest.raises(ValueError, match=r"ulysses = 8 does not divide the model's 12 attention heads; allowed: 1, 2, 3, 4, 6, 12"):
            ParallelLayout(ulysses=8).check_heads(12)

    def test_cfg_is_one_or_two(self):
        with pytest.raises(ValueError, match="parallel.cfg must be 1 or 2"):
            ParallelLayout(cfg=3)

    def test_ranks_are_laid_out_cfg_ring_ulysses(self):
        layout = ParallelLayout(cfg=2, ulysses=2, ring=2)
        assert layout.world_size == 8
        assert [layout.coordinates(rank) for rank in (0, 1, 2, 5, 7)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)]

    def test_shards_differ_by_at_most_one_token(self):
        assert token_shards(45, 4) == [12, 11, 11, 11]
        assert token_shards(32760, 8) == [4095] * 8


@ray.remote(num_cpus=0.1)
class Rank:
    """One gloo rank: the demo model loaded from its checkpoint folder, as a team worker loads it."""

    def __init__(self, source):
        torch.set_num_threads(1)
        self.source = source

    def split_model(self, layout, rank, address):
        """A fresh model split across a new team: a model serves the one team it was split for."""
        from pipeline.generator import VideoModel
        from pipeline.parallel import join

        model = VideoModel.load(self.source, torch.device("cpu"), attention="sdpa")
        model.split_across(join(layout, rank, address, torch.device("cpu")))
        return model

    def forward(self, layout, rank, address):
        """The DiT forward on SHAPE, split across the team (rank 0 returns the gathered prediction)."""
        from pipeline.parallel import leave

        model = self.split_model(layout, rank, address)
        try:
            prediction = single_forward(model.models.transformer)  # on every rank: they meet in its collectives
            return prediction if rank == 0 else None
        finally:
            leave()

    def generate(self, layout, rank, address, params, cancel_after_step=None):
        """A whole job: rank 0 generates (and returns its frames), the others follow."""
        from pipeline.parallel import leave
        from pipeline.sampler import GenerationCancelled

        model = self.split_model(layout, rank, address)
        prompt, negative = embeddings()
        steps = []
        try:
            if rank > 0:
                model.follow(params, lambda: prompt, negative)
                return None
            result = model.generate(params, prompt, negative, on_progress=lambda phase, step, total: steps.append(step),
                                         should_cancel=lambda: cancel_after_step is not None and steps[-1:] == [cancel_after_step])
            return result.frames
        except GenerationCancelled as cancelled:
            return f"cancelled: {cancelled}"
        finally:
            leave()


def single_forward(transformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, *SHAPE, generator=generator)
    context = torch.randn(1, 512, transformer.config.text_dim, generator=generator)
    with torch.inference_mode():
        return transformer(hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=context, return_dict=False)[0]


def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(7, 32, generator=generator), torch.randn(5, 32, generator=generator)


@pytest.fixture(scope="module")
def ranks(serve_instance, demo_source):
    """Four rank actors, reused by every team below (each test joins and leaves a process group)."""
    actors = [Rank.remote(demo_source) for _ in range(4)]
    yield actors
    for actor in actors:
        ray.kill(actor)


def run_team(ranks, layout: ParallelLayout, method: str, *args, **kwargs):
    address = f"tcp://127.0.0.1:{free_port()}"
    return ray.get([getattr(actor, method).remote(layout, rank, address, *args, **kwargs)
                    for rank, actor in enumerate(ranks[: layout.world_size])], timeout=120)[0]


@pytest.mark.parametrize("layout", [ParallelLayout(ulysses=2), ParallelLayout(ring=2), ParallelLayout(ulysses=2, ring=2)],
                         ids=["ulysses2", "ring2", "ulysses2xring2"])
def test_the_split_forward_equals_the_single_process_forward(ranks, demo_source, layout):
    from pipeline.generator import VideoModel

    expected = single_forward(VideoModel.load(demo_source, torch.device("cpu"), attention="sdpa").models.transformer)
    split = run_team(ranks, layout, "forward")
    torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-5)


def test_cfg_across_ranks_with_ulysses_gives_the_single_process_frames(ranks, demo_source):
    """cfg 2 × ulysses 2 on four ranks: the two guidance branches on two halves, each split in two."""
    from pipeline.generator import VideoModel
    from pipeline.params import GenerationParams

    params = GenerationParams(prompt="p", size="624*624", frame_num=5, sample_steps=3, seed=11)
    model = VideoModel.load(demo_source, torch.device("cpu"), attention="sdpa")
    expected = model.generate(params, *embeddings()).frames
    frames = run_team(ranks, ParallelLayout(cfg=2, ulysses=2), "generate", params)
    assert frames.shape == expected.shape
    assert (frames.astype(int) - expected.astype(int)).__abs__().max() <= 1  # uint8 after a float32 decode


def test_a_cancel_on_rank_0_stops_every_rank_at_the_same_step(ranks):
    from pipeline.params import GenerationParams

    params = GenerationParams(prompt="p", size="624*624", frame_num=5, sample_steps=20, seed=11)
    outcome = run_team(ranks, ParallelLayout(cfg=2, ulysses=2), "generate", params, cancel_after_step=2)
    assert outcome == "cancelled: cancelled before step 3 of 20"  # and no rank is left waiting (run_team returned)


# -- the Serve graph -------------------------------------------------------------------------------

APP, ONE_PROCESS_APP = "parallel", "one-process"
VIDEO = {"prompt": "a lighthouse at dusk", "seed": 5, "size": "624*624", "frame_num": 5, "sample_steps": 3}


@pytest.fixture(scope="module")
def parallel_app(serve_instance, tmp_path_factory):
    app = deploy(serve_instance, APP, tiny_args(tmp_path_factory.mktemp(APP), max_attempts=2,
                                                generator={"parallel": {"ulysses": 2}}))
    yield app
    serve.delete(APP)


def team_workers(client) -> list[dict]:
    return client.get("/readyz").json()["stages"]["video_generator"]["team"]["workers"]


def test_the_graph_serves_the_one_process_video(parallel_app, serve_instance, tmp_path_factory):
    with parallel_app.client() as client:
        report = client.get("/readyz").json()["stages"]["video_generator"]
        assert report["team"]["world_size"] == 2 and [worker["rank"] for worker in report["team"]["workers"]] == [1]
        split = client.post("/v1/videos/sync", json=VIDEO)
    assert split.status_code == 200, split.text
    one_process = deploy(serve_instance, ONE_PROCESS_APP, tiny_args(tmp_path_factory.mktemp(ONE_PROCESS_APP)))
    try:
        with one_process.client() as client:
            single = client.post("/v1/videos/sync", json=VIDEO)
    finally:
        serve.delete(ONE_PROCESS_APP)
    assert single.status_code == 200, single.text
    assert split.content == single.content  # the same frames, encoded the same way


def test_a_worker_dying_mid_job_reruns_the_job_on_a_replaced_team(parallel_app):
    import os
    import signal

    with parallel_app.client() as client:
        (worker,) = team_workers(client)  # asked while idle: a busy generator's probe waits behind its job
        job = submit(client, prompt="a worker dies under this job", sample_steps=30)
        poll(client, job["id"], lambda job: job["phase"] == "denoise" and job["step"] >= 2, timeout=120)
        os.kill(worker["pid"], signal.SIGKILL)
        done = poll(client, job["id"], finished, timeout=240)
        assert (done["status"], done["attempts"], done["error"]) == ("completed", 2, None)
        (replacement,) = team_workers(client)  # /readyz answers: the replaced team is ready
        assert replacement["pid"] != worker["pid"]
        after = submit(client, prompt="the replaced team's next job")
        assert poll(client, after["id"], finished, timeout=120)["status"] == "completed"


def test_a_parallel_setting_that_cannot_run_is_refused_by_name(tmp_path):
    from pydantic import ValidationError

    from deployments.app import AppArgs

    with pytest.raises(ValidationError, match="gpus_per_replica must be 8"):
        AppArgs(**tiny_args(tmp_path, generator={"gpus_per_replica": 4, "parallel": {"cfg": 2, "ulysses": 4}}))
    with pytest.raises(ValidationError, match="does not combine with cfg_parallel"):
        AppArgs(**tiny_args(tmp_path, generator={"gpus_per_replica": 2, "cfg_parallel": True, "parallel": {"ulysses": 2}}))


def test_a_ulysses_degree_the_model_cannot_take_fails_the_build_naming_the_allowed_degrees(tmp_path):
    """The demo model has 2 heads: ulysses 4 is refused before any replica starts."""
    from deployments.app import build

    with pytest.raises(ValueError, match=r"ulysses = 4 does not divide the model's 2 attention heads; allowed: 1, 2"):
        build(tiny_args(tmp_path, generator={"parallel": {"ulysses": 4}}))
