"""Unpaired two-domain image data, and a built-in demo data set.

    python datasets.py demo                 # writes datasets/demo (procedural summer/winter scenes)

Layout read by train.py / test.py, either of:
    ROOT/train/A  ROOT/train/B  ROOT/test/A  ROOT/test/B     (the seed's)
    ROOT/trainA   ROOT/trainB   ROOT/testA   ROOT/testB      (the authors' zips)
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

DATASETS_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets"
IMG_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm"}


def domain_dir(root, split, domain):
    """ROOT/split/domain or ROOT/splitdomain, whichever exists."""
    root = Path(root)
    if not root.is_dir():
        name = root.name or "NAME"
        raise ValueError(f"data root {root} does not exist: download it with `wget {DATASETS_URL}/{name}.zip && "
                         f"unzip {name}.zip -d {root.parent}`, or make the demo set with `python datasets.py demo`")
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
    """PIL image -> (C, H, W) float tensor in [-1, 1]."""
    return TF.to_tensor(img) * 2 - 1


class ImageDataset(Dataset):
    """Unaligned pairs: item (epoch, i) is A[i % |A|] with a random B, augmented as the seed.

    All randomness (which B, crop, flip) comes from (seed, epoch, i), so the data a step sees is a
    pure function of the step: a resumed run, and any number of loader workers, see the same stream.
    """

    def __init__(self, root, size, input_nc=3, output_nc=3, split="train", seed=0):
        self.files_A = list_images(domain_dir(root, split, "A"))
        self.files_B = list_images(domain_dir(root, split, "B"))
        self.size, self.input_nc, self.output_nc, self.seed = size, input_nc, output_nc, seed

    def __len__(self):
        return max(len(self.files_A), len(self.files_B))

    def augment(self, img, rng):
        """Resize the shorter side to 1.12 * size (bicubic), random size x size crop, random h-flip."""
        img = TF.resize(img, int(self.size * 1.12), TF.InterpolationMode.BICUBIC)
        w, h = img.size
        top, left = rng.integers(0, h - self.size + 1), rng.integers(0, w - self.size + 1)
        img = TF.crop(img, int(top), int(left), self.size, self.size)
        return to_tensor(TF.hflip(img) if rng.random() < 0.5 else img)

    def __getitem__(self, key):
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        path_A = self.files_A[i % len(self.files_A)]
        path_B = self.files_B[rng.integers(len(self.files_B))]
        return {"A": self.augment(load_image(path_A, self.input_nc), rng),
                "B": self.augment(load_image(path_B, self.output_nc), rng)}


class EpochSampler(Sampler):
    """Yields (epoch, i) keys in an order fixed by (seed, epoch), from sample `start` on; sharded by rank."""

    def __init__(self, n, seed, rank=0, world_size=1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def _order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)[self.rank::self.world_size]

    def __iter__(self):
        return iter([(self.epoch, int(i)) for i in self._order()[self.start:]])

    def __len__(self):
        return max(0, len(range(self.rank, self.n, self.world_size)) - self.start)


class ImageFolder(Dataset):
    """Every image of one folder at its own size, for test.py: (image (C, H, W), file stem)."""

    def __init__(self, folder, nc=3):
        self.files, self.nc = list_images(folder), nc

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return to_tensor(load_image(self.files[i], self.nc)), self.files[i].stem


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the procedural summer/winter demo data set")
    demo.add_argument("--root", default="datasets/demo")
    demo.add_argument("--size", type=int, default=40, help="side of the generated images (px)")
    demo.add_argument("--n_train", type=int, default=300, help="training images per domain")
    demo.add_argument("--n_test", type=int, default=20, help="test images per domain")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        root = make_demo(args.root, args.size, args.n_train, args.n_test, args.seed)
        print(f"wrote {2 * args.n_train} training and {3 * args.n_test} test images to {root}")


if __name__ == "__main__":
    sys.exit(main())
