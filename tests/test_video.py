import numpy as np
import pytest

from pipeline.video import read_mp4, write_mp4

FRAMES, HEIGHT, WIDTH = 9, 48, 64


def make_frames(count=FRAMES):
    return np.random.default_rng(0).integers(0, 256, (count, HEIGHT, WIDTH, 3), dtype=np.uint8)


def top_level_boxes(data: bytes) -> list[str]:
    """The MP4's top-level box types in file order (ISO BMFF: 32-bit size, 4-char type, 64-bit size if 1)."""
    boxes, offset = [], 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        if size == 1:
            size = int.from_bytes(data[offset + 8 : offset + 16], "big")
        elif size == 0:
            size = len(data) - offset
        boxes.append(data[offset + 4 : offset + 8].decode("latin-1"))
        offset += size
    assert offset == len(data), "box sizes do not add up to the file size"
    return boxes


def test_mp4_round_trip_is_browser_playable(tmp_path):
    path = write_mp4(make_frames(), tmp_path / "clip.mp4")
    frames, meta = read_mp4(path)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert meta["codec"] == "h264"
    assert meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == 16
    boxes = top_level_boxes(path.read_bytes())
    assert boxes.index("moov") < boxes.index("mdat")  # faststart: playable while it downloads


def test_write_leaves_only_the_final_file(tmp_path):
    write_mp4(make_frames(), tmp_path / "clip.mp4")
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((FRAMES, HEIGHT, WIDTH, 4), np.uint8),
        np.zeros((FRAMES, HEIGHT, WIDTH, 3), np.float32),
        np.zeros((FRAMES, HEIGHT, WIDTH), np.uint8),
    ],
    ids=["rgba", "float", "no-channels"],
)
def test_frames_of_a_bad_shape_write_nothing(tmp_path, frames):
    with pytest.raises(ValueError, match=r"uint8 \[F, H, W, 3\]"):
        write_mp4(frames, tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []


class FailingFrames(np.ndarray):
    """Frames whose third one never arrives, as if the producer died while ffmpeg was encoding."""

    def __iter__(self):
        yield from np.asarray(self)[:2]
        raise OSError("frame source went away")


def test_a_failed_write_keeps_the_previous_file_and_no_temp_file(tmp_path):
    path = write_mp4(make_frames(5), tmp_path / "clip.mp4")
    with pytest.raises(OSError, match="went away"):
        write_mp4(make_frames().view(FailingFrames), path)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    assert read_mp4(path)[0].shape[0] == 5
