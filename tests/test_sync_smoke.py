"""The README's promise in one test: the tiny graph turns a prompt into a playable MP4 over HTTP."""

import json

from pipeline.video import read_mp4


def test_sync_video_is_a_playable_mp4(tiny_app, tmp_path):
    with tiny_app.client() as client:
        response = client.post("/v1/videos/sync", json={"prompt": "a red fox in snow", "frame_num": 9, "sample_steps": 3, "size": "624*624"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    job = json.loads(response.headers["x-video-job"])
    assert job["parameters"]["frame_num"] == 9 and job["demo_model"] is True
    assert set(job["timings"]) >= {"queue", "text_encode", "denoise", "decode", "mp4_write"}
    path = tmp_path / "out.mp4"
    path.write_bytes(response.content)
    frames, meta = read_mp4(path)
    assert frames.shape == (9, 624, 624, 3)
    assert meta["codec"] == "h264"
