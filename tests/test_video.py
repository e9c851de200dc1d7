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


def test_frames_added_in_pieces_make_the_same_video_as_one_write(tmp_path):
    from pipeline.video import Mp4Writer

    frames = make_frames()
    whole, _ = read_mp4(write_mp4(frames, tmp_path / "whole.mp4"))
    with Mp4Writer(tmp_path / "pieces.mp4", WIDTH, HEIGHT) as writer:
        for start in (0, 1, 5):
            writer.add(frames[start : start + 4 if start else 1])
    pieces, meta = read_mp4(tmp_path / "pieces.mp4")
    assert np.array_equal(pieces, whole) and meta["fps"] == 16
    with pytest.raises(ValueError, match=r"frames must be uint8 \[n, 48, 64, 3\]"):
        Mp4Writer(tmp_path / "bad.mp4", WIDTH, HEIGHT).add(frames[:, :, :32])


def test_an_aborted_writer_leaves_no_file(tmp_path):
    from pipeline.video import Mp4Writer

    with pytest.raises(KeyboardInterrupt), Mp4Writer(tmp_path / "clip.mp4", WIDTH, HEIGHT) as writer:
        writer.add(make_frames(2))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_streamed_decode_gives_the_pixels_of_a_whole_decode(demo_source):
    """Per-latent-frame decoding (what lets the MP4 encode during the decode) changes no pixel."""
    import torch

    from pipeline.loading import load_vae
    from pipeline.video import decode_latents

    vae = load_vae(demo_source, torch.float32)
    latents = torch.randn(1, vae.config.z_dim, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    chunks = []
    streamed = decode_latents(vae, latents, chunks.append)
    assert [len(chunk) for chunk in chunks] == [1, 4, 4]
    assert np.array_equal(streamed, decode_latents(vae, latents))
    assert np.array_equal(np.concatenate(chunks), streamed)


def test_ffmpeg_starts_without_a_fork_of_the_whole_process():
    """A preexec_fn forces fork(), which gRPC's threads in a Ray replica make abort now and then."""
    import pipeline.video  # noqa: F401 - sets imageio-ffmpeg's switch
    from imageio_ffmpeg._utils import _popen_kwargs

    assert _popen_kwargs(prevent_sigint=True)["preexec_fn"] is None
