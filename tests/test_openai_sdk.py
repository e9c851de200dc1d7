"""The official `openai` SDK drives the whole flow unchanged: create, poll, list, download, delete.

The SDK sends create as multipart/form-data with OpenAI's `seconds` and `size` strings. Four
seconds are 65 frames, a minute of VAE decoding on a CPU, so this app pins frame_num to 5: the
request keeps its OpenAI shape and the job reports the override.
"""

import io

import openai
import pytest
from PIL import Image
from ray import serve

from conftest import deploy, tiny_args
from pipeline.video import read_mp4

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture(scope="module")
def sdk(serve_instance, tmp_path_factory):
    app = deploy(serve_instance, "sdk", tiny_args(tmp_path_factory.mktemp("sdk"), pins={"frame_num": 5}))
    yield openai.OpenAI(base_url=f"{app.url}/v1", api_key="not-checked", max_retries=0)
    serve.delete(app.name)


def test_openai_sdk_round_trip(sdk, tmp_path):
    model = sdk.models.list().data[0].id
    video = sdk.videos.create(model=model, prompt="a red fox in snow", size="832x480", seconds="4",
                              extra_body={"sample_steps": 2, "seed": 7})
    assert video.status == "queued" and isinstance(video.created_at, int) and video.progress == 0
    assert (video.model, video.prompt, video.size) == (model, "a red fox in snow", "832x480")
    job = video.model_dump()
    assert job["parameters"]["sample_steps"] == 2 and job["seed"] == 7  # extra_body fields arrived
    assert job["overridden"] == [{"field": "frame_num", "requested": 65, "effective": 5}]  # seconds="4"

    other = sdk.videos.create(model=model, prompt="never mind", size="832x480")
    sdk.videos.delete(other.id)  # cancels it (queued behind the first, or just started)
    assert sdk.videos.retrieve(other.id).status == "cancelled"

    done = sdk.videos.poll(video.id, poll_interval_ms=200)
    assert done.status == "completed" and done.progress == 100
    assert isinstance(done.completed_at, int) and done.completed_at >= done.created_at
    assert done.seconds == "0.25" and done.error is None

    listed = [item.id for item in sdk.videos.list(limit=1)]  # one per page: follows after=last_id
    assert listed == [other.id, video.id]
    assert [item.id for item in sdk.videos.list(order="asc")] == [video.id, other.id]

    content = sdk.videos.download_content(video.id, variant="video")
    (tmp_path / "fox.mp4").write_bytes(content.content)
    frames, meta = read_mp4(tmp_path / "fox.mp4")
    assert frames.shape == (5, 480, 832, 3) and meta["codec"] == "h264"
    thumbnail = sdk.videos.download_content(video.id, variant="thumbnail")
    assert Image.open(io.BytesIO(thumbnail.content)).format == "JPEG"

    deleted = sdk.videos.delete(video.id)
    assert deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(video.id)
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.videos.create(prompt="too long", seconds="8")  # 129 frames: past the 121-frame limit
