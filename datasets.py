"""Unpaired two-domain image data: loading, the CycleGAN authors' downloads, and a built-in demo data set.

    python datasets.py list                          # the authors' data sets (with sizes) and pretrained generators
    python datasets.py download horse2zebra          # -> datasets/horse2zebra/{train,test}/{A,B}
    python datasets.py pretrained horse2zebra        # -> pretrained/horse2zebra.pth
    python datasets.py demo                          # writes datasets/demo (procedural summer/winter scenes)

Layout read by train.py / test.py, either of:
    ROOT/train/A  ROOT/train/B  ROOT/test/A  ROOT/test/B     (the seed's)
    ROOT/trainA   ROOT/trainB   ROOT/testA   ROOT/testB      (the authors' zips)
"""
import argparse
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import requests
import torch
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm
from urllib3.util.retry import Retry

from models import load_generator
from utils import open_new, shown

# An image file is decoded only if it has at most MAX_PIXELS pixels (PIL's decompression-bomb limit, 89.5 million:
# 268 MB as RGB), and a training image only if resizing it for its crop makes at most MAX_RESIZED_PIXELS (an aspect
# ratio up to about 200:1 at --size 256): a few KB of PNG can declare billions of pixels.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
MAX_RESIZED_PIXELS = 1 << 24
IMG_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm"}


def domain_dir(root, split, domain):
    """ROOT/split/domain or ROOT/splitdomain, whichever exists."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"data root {root} is a file, not a folder: pass the folder that holds train/A, train/B, "
                         f"test/A and test/B")
    if not root.is_dir():
        if root.name in DATASETS:
            where = "" if root.parent == Path("datasets") else f" --root {root.parent}"
            raise ValueError(f"data root {root} does not exist: download it with `python datasets.py download "
                             f"{root.name}{where}`, or make the demo set with `python datasets.py demo`")
        raise ValueError(f"data root {root} does not exist: pass a folder holding train/A, train/B, test/A, test/B "
                         f"(`python datasets.py list` names the CycleGAN data sets), or make the demo set with "
                         f"`python datasets.py demo`")
    for d in (root / split / domain, root / f"{split}{domain}"):
        if d.is_dir():
            return d
    raise ValueError(f"no folder {root / split / domain} (or {root / (split + domain)}): "
                     f"put the domain-{domain} {split} images there")


def list_images(folder):
    """Image files in folder, sorted; raises ValueError if there are none."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder} holds no image files ({', '.join(sorted(IMG_EXTENSIONS))})")
    return files


def not_an_image(path, too_big=None):
    """Why path cannot be used as an image, from its header only (Image.open decodes no pixels), or None if it can.

    Images of more than MAX_PIXELS pixels are refused, and so are those for which too_big(width, height) gives a
    reason (a string)."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():  # PIL warns of images over its limit: our reason says it instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # parses the header only
                w, h = img.size
    except Image.DecompressionBombError as e:  # over twice PIL's limit: it does not even say the size
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        return (f"{int(pixels[1]) / 1e6:.0f} million pixels" if pixels else "too many pixels") + too_many_pixels()
    except UnidentifiedImageError:
        if path.name.startswith("._"):
            return "macOS metadata (AppleDouble) file, not an image"
        return "not an image file (unknown format)"
    except Exception as e:  # PIL plugins raise many types on broken headers
        return f"{type(e).__name__}: {e}"
    if w * h > MAX_PIXELS:
        return f"{w}x{h} px{too_many_pixels()}"
    return too_big(w, h) if too_big else None


def too_many_pixels():
    return f": more than the {MAX_PIXELS / 1e6:.1f} million pixels decoded at most (a decompression bomb?)"


def too_big_to_resize(side):
    """too_big for not_an_image: why an image resized to a shorter side of `side` px would be too large, or None."""
    def reason(w, h):
        long = int(side * max(w, h) / min(w, h))
        if side * long > MAX_RESIZED_PIXELS:
            return (f"{w}x{h} px: resized to a shorter side of {side} px for the crops it would have "
                    f"{side * long / 1e6:.0f} million pixels (over {MAX_RESIZED_PIXELS / 1e6:.1f} million; "
                    f"aspect ratio {max(w, h) / min(w, h):.0f}:1)")
        return None
    return reason


def scan_images(files, too_big=None):
    """Split files into (readable, [(path, reason)]) by their headers (see not_an_image)."""
    reasons = [(path, not_an_image(path, too_big)) for path in files]
    return [p for p, r in reasons if r is None], [(p, r) for p, r in reasons if r is not None]


def readable_images(folder, max_bad=0.1, too_big=None):
    """list_images(folder) less the files that cannot be images: (files, skipped [(path, reason)]).

    Raises ValueError, listing them, when more than max_bad of the folder is unreadable. AppleDouble
    `._name` files (a Mac's copy onto a FAT/exFAT drive makes one per image) are skipped but not counted."""
    files = list_images(folder)
    good, bad = scan_images(files, too_big)
    metadata = sum(p.name.startswith("._") for p, _ in bad)
    if len(bad) - metadata > max_bad * (len(files) - metadata) or not good:
        raise ValueError(f"{len(bad)} of {len(files)} image files in {folder} cannot be read (more than "
                         f"{max_bad:.0%}): fix or remove them, or check that this is the right folder:\n"
                         + format_bad(bad))
    return good, bad


def format_bad(bad, limit=20):
    """'  PATH: reason' lines for at most `limit` files, then '  and N more'."""
    lines = [f"  {shown(path)}: {reason}" for path, reason in bad[:limit]]
    return "\n".join(lines + [f"  and {len(bad) - limit} more"] * (len(bad) > limit))


def skipped_summary(skipped):
    """The one start-of-run message naming the files left out (empty string if none)."""
    if not skipped:
        return ""
    return f"left out {len(skipped)} file{'s' * (len(skipped) > 1)} that cannot be images:\n" + format_bad(skipped)


def new_bad_files(bad, seen):
    """The lines of a batch's "bad" entry (a str, or a list of them when batched) not yet in `seen`; adds them.

    Loader workers are separate processes, so only the main process can report each bad file once."""
    lines = [line for entry in ([bad] if isinstance(bad, str) else bad) for line in entry.splitlines()]
    new = [line for line in dict.fromkeys(lines) if line not in seen]
    seen.update(new)
    return new


def load_image(path, nc=3):
    """Open any PIL mode as RGB (nc=3) or L (nc=1): EXIF rotation applied, alpha over white, 16-bit scaled."""
    img = ImageOps.exif_transpose(Image.open(path))
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max() > 255:  # 16-bit (PNGs open as I;16 or I): scale, don't clip
            a = a / 257
        elif img.mode == "F" and a.max() <= 1:  # float in [0, 1]
            a = a * 255
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("L" if nc == 1 else "RGB")


def to_tensor(img):
    """PIL image (RGB or L) -> (C, H, W) float tensor in [-1, 1]; the same numbers as torchvision's to_tensor * 2 - 1."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).reshape(img.size[1], img.size[0], -1) / 255)
    return x.permute(2, 0, 1).contiguous() * 2 - 1


def resize_shorter_side(img, side):
    """Bicubic resize of the shorter side to `side`, the longer in proportion (rounded down), as torchvision's
    Resize(side) does to a PIL image. PIL directly: torchvision's import alone costs seconds of every start-up."""
    w, h = img.size
    new_short, new_long = side, int(side * max(w, h) / min(w, h))
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    return img if size == (w, h) else img.resize(size, Image.BICUBIC)


class ImageDataset(Dataset):
    """Unaligned pairs: item (epoch, i) is A[i % |A|] with a random B, augmented as the seed.

    All randomness (which B, crop, flip) comes from (seed, epoch, i), so the data a step sees is a
    pure function of the step: a resumed run, and any number of loader workers, see the same stream.
    Files that cannot be images are left out at construction (self.skipped: [(path, reason)]); one
    that fails to decode later is replaced by an image drawn from (seed, epoch, i, attempt) and
    named in the item's "bad" string ("PATH: reason" lines), for the main process to report.
    """

    attempts = 5  # decode failures in a row before giving up on an item

    def __init__(self, root, size, input_nc=3, output_nc=3, split="train", seed=0):
        self.size, self.input_nc, self.output_nc, self.seed = size, input_nc, output_nc, seed
        self.side = int(size * 1.12)  # the shorter side after resizing, before the random crop
        too_big = too_big_to_resize(self.side)
        self.files_A, skipped_A = readable_images(domain_dir(root, split, "A"), too_big=too_big)
        self.files_B, skipped_B = readable_images(domain_dir(root, split, "B"), too_big=too_big)
        self.skipped = skipped_A + skipped_B

    def __len__(self):
        return max(len(self.files_A), len(self.files_B))

    def augment(self, img, rng):
        """Resize the shorter side to 1.12 * size (bicubic), random size x size crop, random h-flip."""
        img = resize_shorter_side(img, self.side)
        w, h = img.size
        top, left = int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1))
        img = img.crop((left, top, left + self.size, top + self.size))
        return to_tensor(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img)

    def load(self, files, k, nc, key, domain):
        """(files[k] as an image, bad lines); a file that fails to decode is replaced by one drawn from
        (seed, epoch, i, domain, attempt) alone, never from what this process loaded before."""
        bad = []
        for attempt in range(self.attempts):
            try:
                return load_image(files[k], nc), bad
            except Exception as e:  # a broken file makes PIL raise OSError, SyntaxError, ValueError, ...
                bad.append(f"{shown(files[k])}: cannot be decoded ({type(e).__name__}: {e})")
                k = int(np.random.default_rng([self.seed, *key, domain, attempt]).integers(len(files)))
        raise RuntimeError(f"{self.attempts} files in a row failed to decode; is the data set readable?\n" + "\n".join(bad))

    def __getitem__(self, key):
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        k_B = int(rng.integers(len(self.files_B)))
        img_A, bad_A = self.load(self.files_A, i % len(self.files_A), self.input_nc, key, 0)
        img_B, bad_B = self.load(self.files_B, k_B, self.output_nc, key, 1)
        return {"A": self.augment(img_A, rng), "B": self.augment(img_B, rng), "bad": "\n".join(bad_A + bad_B)}


class EpochSampler(Sampler):
    """Yields (epoch, i) keys in an order fixed by (seed, epoch): this rank's share of the epoch from sample `start` on.

    `start` counts the samples all ranks took, so a run can resume on another number of processes. The rest of the
    epoch is padded by wrapping round to a multiple of world_size: every rank takes the same number of steps."""

    def __init__(self, n, seed, rank=0, world_size=1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def _order(self):
        rest = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)[self.start:]
        return np.resize(rest, len(self) * self.world_size)[self.rank::self.world_size]

    def __iter__(self):
        return iter([(self.epoch, int(i)) for i in self._order()])

    def __len__(self):
        return -(-max(0, self.n - self.start) // self.world_size)  # ceil


class ImageFolder(Dataset):
    """Image files at their own size, for test.py: item i is (image (C, H, W), i, "") or (None, i, "reason").

    Files that cannot be images, or that too_big(width, height) refuses, are left out (self.skipped). An image whose
    longer side is over max_size px is scaled down to it. self.names[i] names the outputs (output_names)."""

    def __init__(self, files, nc=3, too_big=None, max_size=None):
        self.files, self.skipped = scan_images(files, too_big)
        self.names = output_names(self.files)
        self.nc, self.max_size = nc, max_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            img = load_image(self.files[i], self.nc)
            if self.max_size and max(img.size) > self.max_size:
                img = img.resize(fit_size(*img.size, self.max_size), Image.BICUBIC, reducing_gap=3.0)
            return to_tensor(img), i, ""
        except Exception as e:  # reported and skipped by test.py
            return None, i, f"cannot be decoded ({type(e).__name__}: {e})"


def fit_size(w, h, max_size):
    """(w, h) scaled so that the longer side is max_size, each side at least 1 px."""
    scale = max_size / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def output_names(files, limit=200):
    """A distinct name (without extension) for each file's outputs: its stem, or its whole name where stems clash
    (x.jpg and x.png); printable (bytes that are not UTF-8 become U+FFFD), at most `limit` bytes, never '.' or '..',
    and numbered (x_2, x_3) where two would still be equal, ignoring case as some file systems do."""
    stems = Counter(p.stem for p in files)
    names, taken = [], set()
    for p in files:
        name = shown(p.stem if stems[p.stem] == 1 else p.name).encode()[:limit].decode("utf-8", "ignore")
        name = name if name.strip(".") else "_" + name  # '', '.' or '..' (the stem of '..png' is '.')
        base, k = name, 1
        while name.casefold() in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name.casefold())
        names.append(name)
    return names


# ---- demo data: procedural landscapes, the same scene rendered in summer and in winter ----

def render_scene(rng, size, winter):
    """One (size, size, 3) uint8 landscape: sky, a mountain ridge, ground and pine trees."""
    s = 2 * size  # draw at 2x, downsample for anti-aliasing
    y, x = np.mgrid[0:s, 0:s] / s
    ridge = 0.35 + 0.12 * rng.random() + sum(rng.uniform(0.02, 0.07) * np.sin(2 * np.pi * (f * x + rng.random()))
                                             for f in (1, 2, 4))
    horizon = 0.62 + 0.1 * rng.random() + 0.03 * np.sin(2 * np.pi * (x + rng.random()))
    snow_line = ridge + 0.06 + 0.1 * rng.random()
    trees = [(rng.uniform(0, 1), rng.uniform(0.68, 1.0), rng.uniform(0.08, 0.16)) for _ in range(rng.integers(3, 8))]

    sky_top, sky_bottom = ((0.55, 0.6, 0.68), (0.85, 0.86, 0.9)) if winter else ((0.15, 0.4, 0.85), (0.6, 0.8, 0.95))
    img = np.array(sky_top) + (np.array(sky_bottom) - np.array(sky_top)) * y[..., None]
    mountain = y > ridge
    img[mountain] = (0.45, 0.4, 0.33)
    if winter:
        img[mountain & (y < snow_line)] = (0.93, 0.94, 0.97)
    ground = y > horizon
    shade = (0.9 + 0.1 * (y - horizon))[..., None]
    img[ground] = ((np.array((0.95, 0.96, 1.0)) if winter else np.array((0.2, 0.55, 0.15))) * shade)[ground]
    for tx, base, height in sorted(trees, key=lambda t: t[1]):
        tree = (y < base) & (y > base - height) & (np.abs(x - tx) < 0.35 * (y - (base - height)))
        img[tree] = (0.05, 0.25, 0.1)
        if winter:
            img[tree & (y < base - 0.6 * height)] = (0.9, 0.92, 0.95)
    img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def make_demo(root, size=40, n_train=300, n_test=20, seed=0):
    """train/A summer, train/B winter (different scenes); test/A, test/B and test/truth_B, the winter twin of each test/A."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    jobs = [("train/A", False, n_train), ("train/B", True, n_train), ("test/A", False, n_test), ("test/B", True, n_test)]
    for sub, winter, n in jobs:
        (root / sub).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            scene = rng.integers(2**32)
            Image.fromarray(render_scene(np.random.default_rng(scene), size, winter)).save(root / sub / f"{k:04d}.png")
            if sub == "test/A":  # same scene, other season: the ground truth for G_A2B
                (root / "test/truth_B").mkdir(exist_ok=True)
                Image.fromarray(render_scene(np.random.default_rng(scene), size, True)).save(root / "test/truth_B" / f"{k:04d}.png")
    return root


# ---- downloads: the CycleGAN authors' data sets and pretrained generators ----

DATASET_URLS = ("http://efrosgans.eecs.berkeley.edu/cyclegan/datasets",  # current location
                "https://people.eecs.berkeley.edu/~taesung_park/CycleGAN/datasets")  # older one, tried second
PRETRAINED_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models"
# Zip sizes in bytes as TensorFlow Datasets recorded them (cycle_gan checksums); ae_photos' size is not known.
DATASETS = {"apple2orange": 78456409, "summer2winter_yosemite": 132640856, "horse2zebra": 116867962,
            "monet2photo": 305231073, "cezanne2photo": 279885071, "ukiyoe2photo": 292946532,
            "vangogh2photo": 306590349, "maps": 1476754427, "cityscapes": 279601602, "facades": 35135868,
            "iphone2dslr_flower": 339964458, "ae_photos": None}
PRETRAINED = ("horse2zebra", "zebra2horse", "summer2winter_yosemite", "winter2summer_yosemite", "apple2orange",
              "orange2apple", "monet2photo", "style_monet", "style_cezanne", "style_ukiyoe", "style_vangogh", "sat2map",
              "map2sat", "facades_photo2label", "facades_label2photo", "cityscapes_photo2label", "cityscapes_label2photo",
              "iphone2dslr_flower")
TIMEOUT = (10, 60)  # seconds to connect, and to wait for the next bytes before resuming
CHUNK = 1 << 16  # bytes per read at most; a cut loses the read it interrupts, the next try asks for it again
STALL = (60, 1 << 16)  # fewer bytes than STALL[1] in STALL[0] seconds is a stall, however steadily they trickle in
# A body may exceed the listed size by this fraction (plus 1 MiB); without a listed size, data sets may be 1 GiB and
# generators 100 MB (the authors' 9-block generators are 45 MB).
SIZE_MARGIN, UNLISTED_ZIP, UNLISTED_PTH = 0.05, 1 << 30, 100 << 20
UNPACK_RATIO = 4  # an archive may unpack to at most 4x its size (JPEGs barely compress: a zip bomb does)


class Stalled(requests.ConnectionError):
    """The transfer went on, but slower than the STALL floor."""


def free_bytes(folder):
    return shutil.disk_usage(folder).free


def check_free(folder, need, what):
    """ValueError unless folder's file system has `need` bytes free (and 64 MiB besides)."""
    free = free_bytes(folder)
    if need + (64 << 20) > free:
        raise ValueError(f"{what} needs {need / 1e6:.0f} MB of disk in {folder}, and {free / 1e6:.0f} MB are free: "
                         f"free some space (or pass another --root) and run again")


def http_session(retries):
    """A requests session that retries connection errors and 429/5xx answers with exponential backoff."""
    retry = Retry(total=retries, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504), allowed_methods={"GET"})
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def download(session, url, part, retries, limit):
    """Fetch url into the file `part`, resuming what it holds with a Range request; returns part once complete.

    The adapter retries until a response starts; a transfer cut, silent for TIMEOUT[1] s or slower than the STALL
    floor resumes here, up to `retries` times in a row without progress. The file never grows past `limit` bytes:
    a larger declared length is refused before anything is written, a longer body is cut off (ValueError)."""
    failures = 0
    while True:
        start = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={start}-"} if start else {})}  # byte counts = file
        stalled = False
        with session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
            content_range = r.headers.get("Content-Range", "")
            if r.status_code == 416 and content_range == f"bytes */{start}":
                return part  # it was complete already
            if r.status_code == 416 or (r.status_code == 206 and not content_range.startswith(f"bytes {start}-")):
                part.unlink()  # the ranges do not line up (the file changed?): start over
                failures += 1
                if failures > retries:
                    raise requests.ConnectionError(f"the server's ranges never matched {part.name}")
                continue
            r.raise_for_status()
            if r.status_code == 200:
                start = 0  # the server ignored Range (or none was asked): the body is the whole file
            length = r.headers.get("Content-Length", "")
            total = start + int(length) if length.isdigit() else None
            if total is not None and total > limit:
                raise ValueError(f"{url} declares {total / 1e6:.1f} MB, more than the {limit / 1e6:.1f} MB expected "
                                 f"of {part.name[:-5]}: refused before writing anything")
            check_free(part.parent, (total or limit) - start, f"downloading {part.name[:-5]}")
            try:
                with open_append(part) if start else open_new(part) as f, \
                        tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=part.name[:-5]) as bar:
                    size, window = start, (time.monotonic(), start)
                    while chunk := r.raw.read1(CHUNK, decode_content=True):
                        if size + len(chunk) > limit:
                            raise ValueError(f"{url} sent more than the {limit / 1e6:.1f} MB expected of "
                                             f"{part.name[:-5]}: stopped there")
                        f.write(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
                        now = time.monotonic()
                        if now - window[0] >= STALL[0]:
                            if size - window[1] < STALL[1]:
                                raise Stalled(f"fewer than {STALL[1]} bytes in {STALL[0]} s")
                            window = (now, size)
            except Stalled:
                stalled = True
            except (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError):
                pass  # cut or silent: resume below (an error of our own disk is no network error: it propagates)
        size = part.stat().st_size
        if total is None and not stalled or size == total:
            return part
        failures = 0 if size > start and not stalled else failures + 1
        if failures > retries:
            how = "slower than the stall floor" if stalled else f"stopped at {size} of {total} bytes"
            raise requests.ConnectionError(f"the transfer was {how} {failures} times in a row")
        time.sleep(0.5 * (2 ** failures - 1))  # no wait after a transfer that made progress


def open_append(path):
    """path opened to append to, never through a symbolic link."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)), "ab")


def reason(e):
    """A few words on why a request failed: 'HTTP 404', 'Connection refused', 'timed out', ..."""
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code}"
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(e))
    if errno:
        return errno[1]
    if isinstance(e, requests.Timeout):
        return "timed out"
    return str(e).split("Caused by ")[-1]  # urllib3's root cause, e.g. ResponseError('too many 503 error responses')


def fetch(urls, dest, retries, by_hand, limit):
    """Download the first of urls that answers into dest + '.part' and return that path; ValueError if none does.
    limit: the most bytes the file may have (see download)."""
    part = dest.with_name(dest.name + ".part")
    if part.is_symlink():
        raise ValueError(f"{part} is a symbolic link, and a download never writes through one: delete it and run again")
    errors = []
    with http_session(retries) as session:
        for url in urls:
            try:
                return download(session, url, part, retries, limit)
            except requests.RequestException as e:
                errors.append(f"{url}: {reason(e)}")
            except ValueError as e:  # too large: what came is no use
                part.unlink(missing_ok=True)
                raise ValueError(f"{e}; deleted {part}") from None
            except OSError as e:  # our side: a full disk, a folder we may not write to
                kept = f"{part} keeps {part.stat().st_size} bytes" if part.is_file() else "nothing was kept"
                raise ValueError(f"could not write {part} ({e.strerror or e}); {kept}: free space (or fix the "
                                 f"folder) and run again to resume, or delete it") from None
    kept = (f"; {part} keeps {part.stat().st_size} bytes for the next try (delete it to start afresh)"
            if part.exists() else "")
    raise ValueError(f"could not download {dest.name} ({'; '.join(errors)}){kept}. {by_hand}")


def unsafe(info):
    """Whether a zip entry is absolute, climbs out with '..', or is a symbolic link."""
    parts = info.filename.replace("\\", "/").split("/")
    absolute = info.filename.startswith(("/", "\\")) or ":" in parts[0]  # posix root, Windows root or drive
    return absolute or ".." in parts or stat.S_ISLNK(info.external_attr >> 16)


SPLIT_DOMAIN = r"(train|test|val)([AB])"  # the authors' folder names: trainA, testB, ...


def extract(zip_path, target):
    """Unzip into target (NAME/trainA ... becomes train/A ...) through a temporary folder renamed into place."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"CRC check failed for {bad}")
            entry = next((i.filename for i in zf.infolist() if unsafe(i)), None)
            if entry is not None:
                raise ValueError(f"{zip_path} holds {entry!r}, an absolute path, '..' or link: refusing to extract it")
            entry = next((i.filename for i in zf.infolist()
                          if any(len(part.encode()) > 255 for part in i.filename.split("/"))), None)
            if entry is not None:
                raise ValueError(f"{zip_path} holds a name longer than a file system allows (255 bytes): "
                                 f"{entry[:80]!r}...: refusing to extract it")
            unpacked, packed = sum(i.file_size for i in zf.infolist()), zip_path.stat().st_size
            if unpacked > UNPACK_RATIO * packed + (1 << 20):  # the sizes zipfile will hold each member to
                raise ValueError(f"{zip_path} would unpack to {unpacked / 1e6:.0f} MB from {packed / 1e6:.1f} MB, "
                                 f"over {UNPACK_RATIO}x (a zip bomb?): refusing to extract it")
            check_free(target.parent, unpacked, f"unpacking {zip_path.name}")
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
            try:
                zf.extractall(tmp)
                entries = list(tmp.iterdir())
                top = len(entries) == 1 and entries[0].is_dir() and not re.fullmatch(SPLIT_DOMAIN, entries[0].name)
                content = entries[0] if top else tmp  # the authors' zips hold NAME/trainA ...
                for d in list(content.iterdir()):
                    m = re.fullmatch(SPLIT_DOMAIN, d.name)
                    if m and d.is_dir():
                        (content / m[1]).mkdir(exist_ok=True)
                        d.rename(content / m[1] / m[2])
                missing = missing_domains(content)
                if missing:
                    raise ValueError(f"{zip_path} is not a CycleGAN data set: it holds no {', '.join(missing)} "
                                     f"(nor {', '.join(m.replace('/', '') for m in missing)})")
                content.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f"{zip_path} is corrupt ({e})") from None


DOMAINS = ("train/A", "train/B", "test/A", "test/B")


def missing_domains(root):
    """Which of the four domain folders root lacks, in either layout."""
    return [d for d in DOMAINS if not (root / d).is_dir() and not (root / d.replace("/", "")).is_dir()]


def describe(root):
    """'train/A: 1231 files, ...' for the domain folders under root, in either layout ('' if none)."""
    folders = [d for split in ("train", "test", "val") for domain in "AB"
               for d in (root / split / domain, root / f"{split}{domain}") if d.is_dir()]
    return ", ".join(f"{d.relative_to(root).as_posix()}: {sum(1 for _ in d.iterdir())} files" for d in folders)


def download_dataset(name, root="datasets", base_url=None, retries=5):
    """The authors' data set NAME as root/NAME/{train,test}/{A,B}; does nothing if it is already there."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    root, urls = Path(root), [f"{u}/{name}.zip" for u in ([base_url.rstrip("/")] if base_url else DATASET_URLS)]
    target, zip_path = root / name, root / f"{name}.zip"
    if target.exists():
        missing = missing_domains(target)
        if len(missing) == len(DOMAINS):
            raise ValueError(f"{target} exists but holds no train/A, train/B, test/A or test/B: move it away and run again")
        if missing:
            raise ValueError(f"{target} is incomplete (no {', '.join(missing)}): move it away and run again")
        print(f"{target} is already there ({describe(target)}); nothing to do")
        return target
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{name}.extract-*"):  # left by an extraction that was killed
        shutil.rmtree(stale)
    downloaded = not zip_path.exists()  # a zip already there (fetched by hand, or by a run cut while unzipping) is used
    if downloaded:
        by_hand = (f"Fetch {urls[0]} by hand and unzip it into {root}/ (it holds {name}/trainA ...), "
                   f"or save it as {zip_path} and run this again")
        limit = DATASETS[name] + int(SIZE_MARGIN * DATASETS[name]) + (1 << 20) if DATASETS[name] else UNLISTED_ZIP
        fetch(urls, zip_path, retries, by_hand, limit).replace(zip_path)
    try:
        extract(zip_path, target)
    except ValueError as e:
        if downloaded:
            zip_path.unlink()
        raise ValueError(f"{e}; " + ("deleted it: run again to download it afresh" if downloaded
                                     else "delete it and run again to download it")) from None
    except OSError as e:  # a full disk, say: the archive is good, and kept for the next try
        raise ValueError(f"could not unpack {zip_path} into {root} ({e.strerror or e}); nothing was unpacked, and "
                         f"{zip_path} ({zip_path.stat().st_size / 1e6:.1f} MB) is kept: free space and run again "
                         f"to unpack it, or delete it") from None
    if downloaded:
        zip_path.unlink()
    print(f"{target}: {describe(target)}" + ("" if downloaded else f" (kept {zip_path}, which was there before)"))
    return target


def download_pretrained(name, root="pretrained", base_url=None, retries=5):
    """The authors' pretrained generator NAME as root/NAME.pth, checked to load; does nothing if it is there."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained generator {name!r}; known: {', '.join(PRETRAINED)}")
    root, url = Path(root), f"{(base_url or PRETRAINED_URL).rstrip('/')}/{name}.pth"
    dest = root / f"{name}.pth"
    if dest.exists():
        print(f"{dest} is already there; nothing to do")
        return dest
    root.mkdir(parents=True, exist_ok=True)
    part = fetch([url], dest, retries, f"Fetch {url} by hand and save it as {dest}", UNLISTED_PTH)
    try:
        load_generator(part)
    except ValueError as e:
        part.unlink()
        raise ValueError(f"{url} is not a generator, deleted it ({e})") from None
    part.replace(dest)
    print(f"saved {dest}")
    return dest


def print_list():
    """The downloadable data sets with their sizes, and the pretrained generators."""
    print("data sets (python datasets.py download NAME):")
    for name, size in DATASETS.items():
        print(f"  {name:24s} {f'{size / 1e6:7.1f} MB' if size else '   size unknown'}")
    print("pretrained generators (python datasets.py pretrained NAME):")
    print("  " + ", ".join(PRETRAINED))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the procedural summer/winter demo data set")
    demo.add_argument("--root", default="datasets/demo")
    demo.add_argument("--size", type=int, default=40, help="side of the generated images (px)")
    demo.add_argument("--n_train", type=int, default=300, help="training images per domain")
    demo.add_argument("--n_test", type=int, default=20, help="test images per domain")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("list", help="name the authors' data sets (with sizes) and pretrained generators")
    for command, root, what in (("download", "datasets", "data set"), ("pretrained", "pretrained", "generator")):
        p = sub.add_parser(command, help=f"download one of the authors' {what}s (resumes a cut download)")
        p.add_argument("name", help="see `python datasets.py list`")
        p.add_argument("--root", default=root, help=f"folder for the {what} (default {root})")
        p.add_argument("--base_url", help=f"fetch BASE_URL/NAME.{'zip' if what == 'data set' else 'pth'} instead (a mirror)")
        p.add_argument("--retries", type=int, default=5, help="retries after a failed connection or a cut transfer")
    args = parser.parse_args(argv)
    if args.command == "demo":
        root = make_demo(args.root, args.size, args.n_train, args.n_test, args.seed)
        print(f"wrote {2 * args.n_train} training and {3 * args.n_test} test images to {root}")
    elif args.command == "list":
        print_list()
    elif args.command == "download":
        download_dataset(args.name, args.root, args.base_url, args.retries)
    else:
        download_pretrained(args.name, args.root, args.base_url, args.retries)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:  # OSError: a full disk, an unwritable --root, a network error
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted (a download resumes from its .part file when run again)")
