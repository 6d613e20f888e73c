"""Videos through test.py: frame count, rate, size (odd too), timestamps and the audio stream kept; no normalisation
flicker with the clip's shared statistics where --frame_stats has it; a lossless round trip gives the frames
exactly; a clip that cannot be decoded, or has no video stream, is one line and skipped."""

import av
import numpy as np
import pytest
import torch

import models
import video
from conftest import run_script


def write_clip(path, frames, codec="libx264", pix_fmt="yuv420p", rate=12, audio=False):
    """A clip of (H, W, 3) uint8 frames; with audio, a second of a 440 Hz tone (AAC) beside them."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        sound = out.add_stream("aac", rate=16000, layout="mono") if audio else None
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if sound is not None:
            tone = (np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000) * 8000).astype(np.int16)[None]
            for k in range(0, tone.shape[1], 1024):
                chunk = av.AudioFrame.from_ndarray(tone[:, k : k + 1024], format="s16", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, k
                out.mux(sound.encode(chunk))
            out.mux(sound.encode(None))
    return path


def read_frames(path):
    with av.open(str(path)) as clip:
        return [f.to_ndarray(format="rgb24") for f in clip.decode(clip.streams.video[0])]


def moving_square(n=10, h=96, w=160):
    """Green frames with a red square entering from the left: the right half never changes."""
    frames = []
    for i in range(n):
        pixels = np.zeros((h, w, 3), np.uint8)
        pixels[..., 1] = 140
        pixels[30:50, max(0, 4 * i - 20) : 4 * i] = (230, 30, 30)
        frames.append(pixels)
    return frames


def small_generator(blocks=1):
    torch.manual_seed(0)
    return models.Generator(3, 3, blocks).apply(models.weights_init_normal).eval()


@pytest.mark.slow
def test_shared_statistics_keep_still_regions_still_where_per_frame_statistics_move_them(tmp_path):
    clip = write_clip(tmp_path / "square.mkv", moving_square(), codec="ffv1", pix_fmt="bgr0")  # lossless
    still = {}
    for frame_stats in (False, True):
        out = tmp_path / f"out{int(frame_stats)}.mkv"
        video.translate_clip(small_generator(), clip, out, torch.device("cpu"), 3, frame_stats=frame_stats)
        right = np.stack([f[:, 100:].astype(int) for f in read_frames(out)])  # 50+ px from the square
        still[frame_stats] = np.abs(np.diff(right, axis=0)).max()
    assert still[False] == 0 and still[True] >= 2, still


def test_a_lossless_round_trip_gives_the_frames_exactly(tmp_path):
    frames = moving_square(n=5, h=45, w=63)
    clip = write_clip(tmp_path / "in.mkv", frames, codec="ffv1", pix_fmt="bgr0")
    video.translate_clip(torch.nn.Identity(), clip, tmp_path / "out.mkv", torch.device("cpu"), 3, frame_stats=True)
    assert all(np.array_equal(a, b) for a, b in zip(read_frames(tmp_path / "out.mkv"), frames, strict=True))


@pytest.mark.slow
def test_test_py_keeps_count_rate_size_timestamps_and_audio_and_skips_what_it_cannot_read(tmp_path):
    torch.save(small_generator().state_dict(), tmp_path / "G.pth")
    folder = tmp_path / "clips"
    folder.mkdir()
    write_clip(folder / "odd.mp4", moving_square(n=12, h=45, w=63), pix_fmt="yuv444p", rate=15, audio=True)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    with av.open(str(folder / "silent.mp4"), "w") as out:  # audio only
        sound = out.add_stream("aac", rate=16000, layout="mono")
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.int16), format="s16", layout="mono")
        chunk.sample_rate, chunk.pts = 16000, 0
        out.mux(sound.encode(chunk))
        out.mux(sound.encode(None))
    r = run_script("test.py", "--input", folder, "--generator", tmp_path / "G.pth", "--output_dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "skipped" in r.stderr and "broken.mp4: cannot be decoded as a video" in r.stderr
    assert "silent.mp4: has no video stream" in r.stderr and "Traceback" not in r.stderr
    with av.open(str(folder / "odd.mp4")) as a, av.open(str(tmp_path / "out" / "B" / "odd.mp4")) as b:
        va, vb = a.streams.video[0], b.streams.video[0]
        assert (vb.width, vb.height, vb.average_rate) == (63, 45, 15)
        assert [f.time for f in a.decode(va)] == [f.time for f in b.decode(vb)]  # 12 frames, the same timestamps
        sa, sb = a.streams.audio[0], b.streams.audio[0]
        assert (sb.codec_context.name, sb.rate) == ("aac", 16000)
        assert [bytes(p) for p in a.demux(sa) if p.size] == [bytes(p) for p in b.demux(sb) if p.size]  # copied
    page = (tmp_path / "out" / "index.html").read_text()
    assert '<video src="B/odd.mp4" poster="B/odd.poster.png"' in page and (tmp_path / "out/B/odd.poster.png").is_file()
