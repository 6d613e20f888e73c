"""Unpaired two-domain image data: loading, a built-in demo data set, and the command line of downloads.py.

    python datasets.py list                          # the authors' data sets (with sizes) and pretrained generators
    python datasets.py download horse2zebra          # -> datasets/horse2zebra/{train,test}/{A,B}
    python datasets.py pretrained horse2zebra        # -> pretrained/horse2zebra.pth
    python datasets.py demo                          # writes datasets/demo (procedural summer/winter scenes)

Layout read by train.py / test.py, either of:
    ROOT/train/A  ROOT/train/B  ROOT/test/A  ROOT/test/B     (the seed's)
    ROOT/trainA   ROOT/trainB   ROOT/testA   ROOT/testB      (the authors' zips)
"""

import argparse
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from downloads import DATASETS, download_dataset, download_pretrained, print_list
from files import shown
from runtime import loader_workers
from stopping import ignore_signals
from utils import as_image, to_tensor

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
        raise ValueError(
            f"data root {root} is a file, not a folder: pass the folder that holds train/A, train/B, test/A and test/B"
        )
    if not root.is_dir():
        if root.name in DATASETS:
            where = "" if root.parent == Path("datasets") else f" --root {root.parent}"
            raise ValueError(
                f"data root {root} does not exist: download it with `python datasets.py download "
                f"{root.name}{where}`, or make the demo set with `python datasets.py demo`"
            )
        raise ValueError(
            f"data root {root} does not exist: pass a folder holding train/A, train/B, test/A, test/B "
            f"(`python datasets.py list` names the CycleGAN data sets), or make the demo set with "
            f"`python datasets.py demo`"
        )
    for d in (root / split / domain, root / f"{split}{domain}"):
        if d.is_dir():
            return d
    raise ValueError(
        f"no folder {root / split / domain} (or {root / (split + domain)}): "
        f"put the domain-{domain} {split} images there"
    )


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
            return (
                f"{w}x{h} px: resized to a shorter side of {side} px for the crops it would have "
                f"{side * long / 1e6:.0f} million pixels (over {MAX_RESIZED_PIXELS / 1e6:.1f} million; "
                f"aspect ratio {max(w, h) / min(w, h):.0f}:1)"
            )
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
        raise ValueError(
            f"{len(bad)} of {len(files)} image files in {folder} cannot be read (more than "
            f"{max_bad:.0%}): fix or remove them, or check that this is the right folder:\n" + format_bad(bad)
        )
    return good, bad


def format_bad(bad, limit=20):
    """'  PATH: reason' lines for at most `limit` files, then '  and N more'."""
    lines = [f"  {shown(path)}: {reason}" for path, reason in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  and {len(bad) - limit} more")
    return "\n".join(lines)


def skipped_summary(skipped):
    """The one start-of-run message naming the files left out (empty string if none)."""
    if not skipped:
        return ""
    files = "file" if len(skipped) == 1 else "files"
    return f"left out {len(skipped)} {files} that cannot be images:\n" + format_bad(skipped)


def new_bad_files(bad, seen):
    """The lines of a batch's "bad" entry (a str, or a list of them when batched) not yet in `seen`; adds them.

    Loader workers are separate processes, so only the main process can report each bad file once."""
    lines = [line for entry in ([bad] if isinstance(bad, str) else bad) for line in entry.splitlines()]
    new = [line for line in dict.fromkeys(lines) if line not in seen]
    seen.update(new)
    return new


def load_image(path, nc=3):
    """Open any PIL mode as RGB (nc=3) or L (nc=1): EXIF rotation applied, alpha over white, 16-bit scaled."""
    return as_image(Image.open(path), nc)


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

    def __init__(self, root, size, input_nc=3, output_nc=3, split="train", seed=0, load_size=None):
        self.size, self.input_nc, self.output_nc, self.seed = size, input_nc, output_nc, seed
        self.side = load_size or int(size * 1.12)  # the shorter side after resizing, before the random crop
        too_big = too_big_to_resize(self.side)
        self.files_A, skipped_A = readable_images(domain_dir(root, split, "A"), too_big=too_big)
        self.files_B, skipped_B = readable_images(domain_dir(root, split, "B"), too_big=too_big)
        self.skipped = skipped_A + skipped_B

    def __len__(self):
        return max(len(self.files_A), len(self.files_B))

    def augment(self, img, rng):
        """Resize the shorter side to load_size (default 1.12 * size; bicubic), random size x size crop, random
        horizontal flip."""
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
        raise RuntimeError(
            f"{self.attempts} files in a row failed to decode; is the data set readable?\n" + "\n".join(bad)
        )

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
        rest = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)[self.start :]
        return np.resize(rest, len(self) * self.world_size)[self.rank :: self.world_size]

    def __iter__(self):
        return iter([(self.epoch, int(i)) for i in self._order()])

    def __len__(self):
        return -(-max(0, self.n - self.start) // self.world_size)  # ceil


def test_images(root, domain, nc, n=None, size=None):
    """The readable images of ROOT/test/DOMAIN in name order, as (C, H, W) tensors in [-1, 1] and their paths: the
    first n with the shorter side resized to `size` and center-cropped to size x size (the fixed samples of every
    epoch end), or all at their own size (what test.py translates). ([], []) if there is no such folder."""
    try:
        files = list_images(domain_dir(root, "test", domain))
    except ValueError:
        return [], []
    images, paths = [], []
    for path in files:
        if n is not None and len(images) == n:
            break
        try:
            img = None if not_an_image(path) else load_image(path, nc)
        except Exception:  # decoding errors of every kind: test.py reports them; here the image is left out
            img = None
        if img is None:
            continue
        images.append(to_tensor(center_crop(img, size) if size else img))
        paths.append(path)
    return images, paths


def center_crop(img, size):
    """The shorter side resized to `size` (bicubic), then the central size x size: a test image as a sample."""
    img = resize_shorter_side(img, size)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def object_masks(mask_dir, paths, size):
    """train.py --mask_dir: the masks of test images (the same file stem, test.py's convention: black on what is to be
    kept), each resized to its image and cropped as test_images crops it: ((N, 1, size, size) bool, True on the
    object; the indices of the paths that have a readable mask)."""
    try:
        files = {p.stem: p for p in reversed(list_images(mask_dir))}  # x.png before x.jpg: the first name wins
    except ValueError:  # no image files at all
        files = {}
    masks, kept = [], []
    for i, path in enumerate(paths):
        try:
            mask = load_image(files[path.stem], 1).resize(load_image(path).size, Image.BOX)
        except Exception:  # no such mask, or one that cannot be decoded: this image is left out of the probe
            continue
        masks.append(torch.from_numpy(np.array(center_crop(mask, size)) < 128)[None])
        kept.append(i)
    return (torch.stack(masks) if masks else torch.zeros(0, 1, size, size, dtype=torch.bool)), kept


def train_loader(dataset, batch_size, n_cpu, pin_memory, seed, rank=0, world_size=1):
    """The run's data stream: the (epoch, i) items of EpochSampler. Workers ignore Ctrl-C / SIGTERM, so the main
    process can finish its step and save; their own generator keeps the loader off the global torch RNG."""
    workers = loader_workers(n_cpu, len(dataset))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed, rank, world_size),
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=ignore_signals,
        generator=torch.Generator(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )


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


def render_scene(rng, size, winter, house=False):
    """One (size, size, 3) uint8 landscape: sky, a mountain ridge, ground and pine trees. house=True: also a red
    house on the ground, the same in both seasons (its numbers are the scene's last draws: the rest is unchanged),
    and the picture comes with the house's mask, (size, size) uint8, 255 on the house."""
    s = 2 * size  # draw at 2x, downsample for anti-aliasing
    y, x = np.mgrid[0:s, 0:s] / s
    ridge = (
        0.35
        + 0.12 * rng.random()
        + sum(rng.uniform(0.02, 0.07) * np.sin(2 * np.pi * (f * x + rng.random())) for f in (1, 2, 4))
    )
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

    def shrink(a):  # (2 size, 2 size, ...) in [0, 1] to (size, size, ...) uint8
        return np.asarray(
            Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        )

    if not house:
        return shrink(img)
    hx, base, w = rng.uniform(0.2, 0.8), rng.uniform(0.84, 0.96), rng.uniform(0.2, 0.3)  # centre, ground, width
    walls = (np.abs(x - hx) < w / 2) & (y < base) & (y > base - 0.55 * w)
    eaves = base - 0.55 * w  # the roof: a triangle 0.45 w high, a little wider than the walls
    roof = (
        (y <= eaves) & (y > eaves - 0.45 * w) & (np.abs(x - hx) < (w / 2 + 0.02) * (y - eaves + 0.45 * w) / (0.45 * w))
    )
    door = (np.abs(x - hx) < 0.1 * w) & (y < base) & (y > base - 0.3 * w)
    img[walls], img[roof], img[door] = (0.72, 0.16, 0.12), (0.28, 0.22, 0.22), (0.3, 0.15, 0.08)
    return shrink(img), shrink((walls | roof).astype(np.float64))


def make_demo(root, size=40, n_train=300, n_test=20, seed=0, objects=False):
    """train/A summer, train/B winter (different scenes); test/A, test/B and test/truth_B, the winter twin of each
    test/A. objects=True: a house in every scene, unchanged in winter, and test/mask_A/NAME.png for each test/A
    scene, black on the house and white elsewhere (test.py --mask_dir: translate all but the house)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    jobs = [
        ("train/A", False, n_train),
        ("train/B", True, n_train),
        ("test/A", False, n_test),
        ("test/B", True, n_test),
    ]
    folders = ["test/truth_B", *(sub for sub, _, _ in jobs)]
    if objects:
        folders.append("test/mask_A")
    for sub in folders:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for sub, winter, n in jobs:
        for k in range(n):
            scene = rng.integers(2**32)
            renders = [(sub, winter), ("test/truth_B", True)] if sub == "test/A" else [(sub, winter)]  # the truth
            for folder, season in renders:
                picture = render_scene(np.random.default_rng(scene), size, season, objects)
                picture, house = picture if objects else (picture, None)
                Image.fromarray(picture).save(root / folder / f"{k:04d}.png")
                if objects and folder == "test/A":
                    Image.fromarray(255 - house).save(root / "test/mask_A" / f"{k:04d}.png")
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the procedural summer/winter demo data set")
    demo.add_argument("--root", default="datasets/demo")
    demo.add_argument("--size", type=int, default=40, help="side of the generated images (px)")
    demo.add_argument("--n_train", type=int, default=300, help="training images per domain")
    demo.add_argument("--n_test", type=int, default=20, help="test images per domain")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--objects",
        action="store_true",
        help="a house in every scene, the same in both seasons, and its masks in test/mask_A (docs/training.md)",
    )
    sub.add_parser("list", help="name the authors' data sets (with sizes) and pretrained generators")
    for command, root, what in (("download", "datasets", "data set"), ("pretrained", "pretrained", "generator")):
        p = sub.add_parser(command, help=f"download one of the authors' {what}s (resumes a cut download)")
        p.add_argument("name", help="see `python datasets.py list`")
        p.add_argument("--root", default=root, help=f"folder for the {what} (default {root})")
        p.add_argument(
            "--base_url", help=f"fetch BASE_URL/NAME.{'zip' if what == 'data set' else 'pth'} instead (a mirror)"
        )
        p.add_argument("--retries", type=int, default=5, help="retries after a failed connection or a cut transfer")
    args = parser.parse_args(argv)
    if args.command == "demo":
        root = make_demo(args.root, args.size, args.n_train, args.n_test, args.seed, args.objects)
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
