"""Videos through a generator, one frame at a time (memory does not grow with the clip's length): decoded and encoded
with PyAV (FFmpeg's libraries, in its wheels), every frame translated with one set of InstanceNorm statistics shared
across the clip (no normalisation flicker: translation.share_statistics), the audio copied unchanged.

    python test.py --input clip.mp4 --generator output/netG_A2B.pth          # -> output/B/clip.mp4
    python test.py --input clip.mp4 --generator G.pth --frame_stats           # each frame its own statistics
"""

import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from files import shown, write_atomic
from translation import pad, release, share_statistics, translate
from utils import as_image, first_line, to_tensor, to_uint8

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi"}
# The encoder for each decoder that has one here; others get H.264 (VP9 in .webm).
ENCODERS = {"h264": "libx264", "hevc": "libx264", "vp9": "libvpx-vp9", "vp8": "libvpx-vp9", "av1": "libsvtav1",
            "ffv1": "ffv1", "mpeg4": "mpeg4", "png": "png"}  # fmt: skip


def is_video(path):
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def encoder(codec, suffix, width, height):
    """(encoder, pixel format) for a clip decoded with `codec` into a file ending in `suffix`: the same codec where
    it can be encoded here, lossless ones kept lossless (RGB), 4:4:4 where a side is odd (4:2:0 needs even sides)."""
    name = ENCODERS.get(codec, "libvpx-vp9" if suffix == ".webm" else "libx264")
    if name in ("ffv1", "png"):
        return name, "bgr0" if name == "ffv1" else "rgb24"
    odd = width % 2 or height % 2
    if odd and name not in ("libx264", "libvpx-vp9"):
        name = "libx264"
    return name, "yuv444p" if odd else "yuv420p"


def frame_tensor(frame, nc):
    """A decoded frame as test.py decodes an image: (1, nc, H, W) in [-1, 1]."""
    return to_tensor(as_image(frame.to_image(), nc))[None]


def sampled(path, nc, k):
    """Up to k frames of the clip at path, evenly spaced through it, as (1, C, H, W) tensors; and its frame count."""
    import av

    with av.open(str(path)) as clip:
        if not clip.streams.video:
            raise ValueError("has no video stream")
        stream = clip.streams.video[0]
        total = stream.frames or sum(1 for _ in clip.decode(stream))
    picks = {round(i * (total - 1) / max(1, k - 1)) for i in range(min(k, total))}
    frames = []
    with av.open(str(path)) as clip:
        for i, frame in enumerate(clip.decode(clip.streams.video[0])):
            if i in picks:
                frames.append(frame_tensor(frame, nc))
    return frames, total


def translate_clip(G, src, dst, device, nc, shared_frames=8, frame_stats=False):
    """Translate the clip at src into dst (the same container; see encoder), frame by frame, keeping its size, frame
    rate and timestamps, and copying its audio; returns dst's first frame translated, (C, H, W) uint8, for a poster.
    Shared statistics (the default) come from up to shared_frames frames sampled evenly through the clip, in a first
    pass whose time is printed; frame_stats: each frame normalised by its own, as the anchors do. ValueError (one
    line) for a file that cannot be decoded or has no video stream."""
    import av

    try:
        frames, total = sampled(src, nc, shared_frames)
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"cannot be decoded as a video ({first_line(e)})") from None
    if not frames:
        raise ValueError("holds no video frame")
    try:
        if not frame_stats:
            start = time.perf_counter()
            share_statistics(G, [pad(f.to(device)) for f in frames])
            print(f"{shown(src.name)}: statistics of {len(frames)} frames in {time.perf_counter() - start:.1f} s")
        return encode(G, src, dst, device, nc, total)
    finally:
        release(G)


def encode(G, src, dst, device, nc, total):
    """The second pass of translate_clip: decode, translate and encode into dst through files.write_atomic (a
    temporary file of its own, renamed to dst when whole); the first frame translated."""
    import av

    posters = []

    def write(f):
        with av.open(str(src)) as clip, av.open(f, "w", format=container_format(dst)) as out:
            vin = clip.streams.video[0]
            ain = clip.streams.audio[0] if clip.streams.audio else None
            name, pix_fmt = encoder(vin.codec_context.name, dst.suffix.lower(), vin.width, vin.height)
            vout = out.add_stream(name, rate=vin.average_rate or vin.guessed_rate or 25)
            vout.width, vout.height, vout.pix_fmt = vin.width, vin.height, pix_fmt
            vout.time_base = vin.time_base
            aout = out.add_stream_from_template(ain) if ain is not None else None
            bar = tqdm(total=total, unit="frame", desc=shown(src.name), leave=False, file=sys.stderr)
            for packet in clip.demux(*[s for s in (vin, ain) if s is not None]):
                if packet.stream is ain:
                    if packet.dts is not None:  # the demuxer's flush packet has none
                        packet.stream = aout
                        out.mux(packet)
                    continue
                for frame in packet.decode():
                    y = to_uint8(translate(G, frame_tensor(frame, nc).to(device))[0].float().cpu())
                    if not posters:
                        posters.append(y)
                    out.mux(vout.encode(video_frame(y, frame, bar.n, vout.average_rate)))
                    bar.update()
            out.mux(vout.encode(None))
            bar.close()

    write_atomic(dst, write)
    return posters[0]


def video_frame(y, source, index, rate):
    """(C, H, W) uint8 -> an av.VideoFrame with the source frame's timestamp (where it has none: its index at the
    frame rate)."""
    import av

    pixels = y[0].numpy() if len(y) == 1 else y.permute(1, 2, 0).numpy()
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="gray" if len(y) == 1 else "rgb24")
    frame.pts, frame.time_base = (index, 1 / rate) if source.pts is None else (source.pts, source.time_base)
    return frame


def container_format(path):
    """FFmpeg's muxer for a file name (the temporary file's name does not say)."""
    return {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}[path.suffix.lower()]
