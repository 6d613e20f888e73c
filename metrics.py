"""FID and KID of translated images against real ones, computed by torch-fidelity with pytorch-fid's Inception weights.

    python test.py --dataroot datasets/horse2zebra --metrics           # B/ against real test/B, A/ against test/A
    python test.py --input photos/ --metrics --reference zebras/        # any translations against any real images
    python test.py --dataroot datasets/horse2zebra --metrics --fid_weights weights-inception-2015-12-05-6726825d.pth

From Python (train.py during training):

    import metrics
    r = metrics.evaluate(fakes, "datasets/horse2zebra/test/B", cache_name="horse2zebra-test-B")
    r["fid"], r["kid_mean"], r["kid_std"]             # fakes: uint8 (C, H, W) tensors, a folder or a Dataset
    metrics.protocol()                                 # what was measured, for metrics.json

The protocol is torch-fidelity's, exactly: its "inception-v3-compat" extractor holds the TF-Inception weights of
pytorch-fid and TTUR (2048 pool features), but resizes to 299 px as TensorFlow 1 did and scales by (x - 128) / 128,
where pytorch-fid 0.3 resizes bilinearly (align_corners=False) and scales by 2x - 1. Measured on the same folders of
256 px scenes, torch-fidelity's FID came out 0.4-0.6% below pytorch-fid's (308.2 vs 310.0, 325.8 vs 327.1): papers'
tables compare to about that. Every image is decoded by this repository's loader (datasets.load_image), on both
sides. KID is the unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^3, mean and std over 100 subsets of
min(1000, smaller set); when both sets have that size every subset is the whole of both, and the std is NaN.
"""

import hashlib
import math
import os
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch_fidelity
from PIL import ExifTags, Image
from torch.utils.data import Dataset
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from checkpoints import load_weights
from datasets import list_images, load_image, test_images
from files import append_row, keep_rows, shown
from runtime import BYTES_PER_PIXEL, precision
from translation import padded_size, translate
from utils import first_line, to_uint8

INCEPTION = "inception-v3-compat"
# The extractor evaluate() and protocol() use unless told otherwise. Tests point it at a tiny extractor they
# register with torch_fidelity.register_feature_extractor, so that nothing downloads Inception's 92 MB.
EXTRACTOR = INCEPTION
KID_SUBSET_SIZE = 1000  # at most: a smaller set sets it (the library refuses subsets larger than a set)
KID_SUBSETS = DEFAULTS["kid_subsets"]  # 100
KID_SEED = DEFAULTS["rng_seed"]  # the library's default, so our KID equals its command line's (fidelity --kid)


def hub_file():
    """Where torch.hub keeps the Inception weights the library downloads: TORCH_HOME/hub/checkpoints/NAME.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(URL_INCEPTION_V3).path)


def missing_weights(reason):
    """The one line for Inception weights that are not on disk and could not be downloaded."""
    return (
        f"FID/KID need the Inception weights, which are not in {shown(hub_file().parent)} and could not be "
        f"downloaded ({reason}): fetch {URL_INCEPTION_V3} on a machine with internet and put it in that folder, "
        f"or pass --fid_weights PATH"
    )


@lru_cache
def _checked_sha256(path, size, mtime_ns):
    """sha256 of a weights file, after checking that it holds tensors only (size and mtime key the cache)."""
    load_weights(path)  # the library loads with weights_only=False: refuse pickled code before it does
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path):
    """sha256 of the weights file at path; ValueError, in one line, if it is missing or not plain tensors."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(
            f"--fid_weights {shown(path)} does not exist: pass the Inception weights file "
            f"({os.path.basename(hub_file())})"
        ) from None
    return _checked_sha256(str(path), st.st_size, st.st_mtime_ns)


def weights_file(extractor, weights):
    """The file the extractor reads its weights from: `weights`, the hub's Inception file, or None (not known)."""
    if weights is not None:
        return Path(weights)
    return hub_file() if extractor == INCEPTION else None


class RGB(Dataset):
    """uint8 (C, H, W) tensors (a list or a Dataset), gray ones repeated to 3 channels as PIL's convert("RGB")."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x = self.items[i]
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


class Decoded(Dataset):
    """Image files decoded as training and test.py decode them (EXIF rotation applied, alpha over white, 16-bit
    scaled, gray repeated to RGB), as uint8 (3, H, W) tensors: both sides of a comparison go through one decoder."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(load_image(self.files[i], 3))).permute(2, 0, 1).contiguous()


def as_dataset(images, which):
    """A folder (its image files), a list of files, or uint8 tensors -> a Dataset of uint8 (3, H, W) tensors."""
    if isinstance(images, (str, Path)):
        if not Path(images).is_dir():
            raise ValueError(f"{which} images: {shown(images)} is not a folder")
        try:
            return Decoded(list_images(images))
        except ValueError as e:
            raise ValueError(f"{which} images: {shown(e)}") from None
    if isinstance(images, (list, tuple)) and not all(torch.is_tensor(x) for x in images):
        return Decoded([Path(p) for p in images])
    return RGB(images)


def sizes_of(data, which):
    """{"WxH": count} of a Dataset from as_dataset: file headers only, or each tensor's shape (one pass)."""
    sizes = {}
    for i in range(len(data)):
        if isinstance(data, Decoded):
            try:
                with Image.open(data.files[i]) as img:
                    w, h = img.size
                    if img.getexif().get(ExifTags.Base.Orientation) in (
                        5,
                        6,
                        7,
                        8,
                    ):  # turned a quarter, as load_image does
                        w, h = h, w
            except OSError as e:
                raise ValueError(f"{which} image {shown(data.files[i])} cannot be read ({first_line(e)})") from None
        else:
            x = data.items[i]
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 3 and x.shape[0] in (1, 3)):
                raise ValueError(f"{which} images must be uint8 (C, H, W) tensors with 1 or 3 channels")
            h, w = x.shape[-2:]
        sizes[f"{w}x{h}"] = sizes.get(f"{w}x{h}", 0) + 1
    return dict(sorted(sizes.items()))


def evaluate(fake, real, *, cuda=False, cache_name=None, cache_root=None, weights=None, extractor=None):
    """FID and KID of `fake` against `real` -> {fid, kid_mean, kid_std, kid_subset_size, fake: {count, sizes},
    real: {count, sizes}}. Each set: a folder, a list of image files, or a list (or Dataset) of uint8 (C, H, W)
    tensors. cache_name: keep the real set's features in the library's cache (cache_root, default
    TORCH_HOME/fidelity_cache) under that name, so later calls extract the fakes only; the name must change when the
    set does. torch's random streams are left as they were. ValueError, in one line, for what the user can fix."""
    extractor = extractor or EXTRACTOR
    data = {"fake": as_dataset(fake, "fake"), "real": as_dataset(real, "real")}
    sets = {k: {"count": len(d), "sizes": sizes_of(d, k)} for k, d in data.items()}
    for which, s in sets.items():
        if s["count"] < 2:  # a covariance, and KID's unbiased estimate, need two images
            raise ValueError(f"FID and KID need at least 2 images in each set; the {which} set has {s['count']}")
    subset = min(KID_SUBSET_SIZE, sets["fake"]["count"], sets["real"]["count"])
    path = weights_file(extractor, weights)  # the hub's file may not be there yet: the library downloads it
    ident = weights_sha256(path)[:16] if weights is not None or (path and path.is_file()) else extractor
    cache_name = cache_name and f"{cache_name}-{ident}"  # other weights, other features
    # Loader workers decode files in parallel; for tensors in memory, or a few files, starting them costs more.
    workers = all(isinstance(d, Decoded) and len(d) >= 256 for d in data.values())
    one_size = len(sets["fake"]["sizes"]) == len(sets["real"]["sizes"]) == 1
    kwargs = dict(
        input1=data["fake"],
        input2=data["real"],
        input2_cache_name=cache_name,
        cache=cache_name is not None,
        cache_root=cache_root,
        cuda=cuda,
        fid=True,
        kid=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=None if weights is None else str(weights),
        kid_subsets=KID_SUBSETS,
        kid_subset_size=subset,
        rng_seed=KID_SEED,
        verbose=False,
        batch_size=64 if one_size else 1,  # the library's DataLoader stacks a batch: one size per batch
        save_cpu_ram=not workers,
    )
    # DataLoader iterators draw a seed from torch's generator: fork it, so that training's streams stay exact.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        try:
            r = torch_fidelity.calculate_metrics(**kwargs)
        except OSError as e:  # urllib's errors are OSErrors: no network, a proxy, a missing release file
            if extractor == INCEPTION and weights is None and not hub_file().is_file():
                raise ValueError(missing_weights(first_line(e))) from None
            raise
        except RuntimeError as e:
            if weights is not None and "state_dict" in str(e):
                raise ValueError(
                    f"--fid_weights {shown(weights)} is not a state_dict of {extractor} ({first_line(e)[:200]})"
                ) from None
            raise
    if path is not None and path.is_file():  # downloaded just now
        ident = weights_sha256(path)[:16]
    # Sets of one size with subsets of that size: every subset is the whole of both, and the std says nothing.
    whole = subset == sets["fake"]["count"] == sets["real"]["count"]
    return {
        "fid": r[torch_fidelity.KEY_METRIC_FID],
        "kid_mean": r[torch_fidelity.KEY_METRIC_KID_MEAN],
        "kid_std": math.nan if whole else r[torch_fidelity.KEY_METRIC_KID_STD],
        "kid_subset_size": subset,
        "weights": ident,
        **sets,
    }


def protocol(*, weights=None, extractor=None):
    """What evaluate() measures, for metrics.json: library and version, feature extractor, its weights file (name,
    sha256, and whether it is the file the library names), and KID's kernel, subsets and seed. The image counts,
    sizes and KID subset size of each measurement are in evaluate()'s result."""
    extractor = extractor or EXTRACTOR
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    path = weights_file(extractor, weights)
    about = None
    if path is not None and path.is_file():
        sha = weights_sha256(path)
        about = {"file": path.name, "sha256": sha}
        if extractor == INCEPTION:  # torch.hub's convention: the file name carries the first digits of its sha256
            prefix = torch.hub.HASH_REGEX.search(os.path.basename(URL_INCEPTION_V3))[1]
            about.update(url=URL_INCEPTION_V3, same_as_library=sha.startswith(prefix))
    return {
        "library": "torch-fidelity",
        "version": torch_fidelity.__version__,
        "feature_extractor": extractor,
        "feature_layer": {m: cls.get_default_feature_layer_for_metric(m) for m in ("fid", "kid")},
        "weights": about,
        "images": "8-bit as decoded (gray repeated to RGB); the extractor resizes them itself",
        "kid": {
            "estimator": "unbiased MMD^2",
            "kernel": "(x.y / d + 1)^3",
            "subsets": KID_SUBSETS,
            "subset_size": f"min({KID_SUBSET_SIZE}, smaller set)",
            "seed": KID_SEED,
        },
    }


# ---- During training (train.py --eval_freq K): the test split, translated by the current generators ----

COLUMNS = [
    "epoch",
    "step",
    "seconds",
    "fid_A2B",
    "kid_A2B",
    "kid_std_A2B",
    "fid_B2A",
    "kid_B2A",
    "kid_std_B2A",
    "weights",
]  # weights: the first 16 hex digits of the extractor's weights file's sha256 (its name if none)


class Tracker:
    """FID and KID of both directions every few epochs, in OUTPUT_DIR/metrics.csv (rank 0 only).

    The real test images are decoded once, as test.py decodes them, and their features are cached by the library under
    a name drawn from the files (paths, sizes, times), so each evaluation extracts only the translations. Rows after
    the epoch a run resumes from are dropped: that epoch is trained again and evaluated again."""

    def __init__(
        self,
        output_dir,
        dataroot,
        input_nc,
        output_nc,
        resumed_epoch=None,
        device=torch.device("cpu"),
        weights=None,
        max_pixels=math.inf,
    ):
        if weights is not None:
            weights_sha256(weights)  # a wrong --fid_weights is said now, not hours later at the first evaluation
        self.path, self.weights = Path(output_dir) / "metrics.csv", weights
        self.files, self.real, self.cache = {}, {}, {}
        for domain, nc in (("A", input_nc), ("B", output_nc)):
            images, self.files[domain] = test_images(dataroot, domain, nc)
            if len(images) < 2:
                raise ValueError(
                    f"--eval_freq: FID and KID need at least 2 readable images in test/{domain} of "
                    f"{shown(dataroot)}; it has {len(images)}"
                )
            for x, path in zip(images, self.files[domain]):
                need = math.prod(padded_size(*x.shape[-2:]))
                if need > max_pixels:  # whole images, as test.py writes them: say so before training, not at its end
                    raise ValueError(
                        f"--eval_freq: {shown(path)} ({x.shape[-1]}x{x.shape[-2]} px) needs about "
                        f"{need * BYTES_PER_PIXEL / 1e9:.1f} GB to translate whole, "
                        f"{max_pixels * BYTES_PER_PIXEL / 1e9:.1f} GB are free: train without --eval_freq "
                        f"and measure afterwards with python test.py --metrics --max_size N"
                    )
            self.real[domain] = [to_uint8(x) for x in images]
            key = hashlib.sha256(
                repr(
                    [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns, nc) for p in self.files[domain]]
                ).encode()
            ).hexdigest()[:16]
            self.cache[domain] = f"cyclegan-test-{domain}-{key}"
        self.rows = keep_rows(self.path, COLUMNS, "epoch", resumed_epoch, text=("weights",))

    def due(self, epoch, every, n_epochs):
        """Whether epoch (a number of epochs done) is one to evaluate, and has not been evaluated yet."""
        return (
            every > 0
            and epoch > 0
            and (epoch % every == 0 or epoch == n_epochs)
            and all(r["epoch"] != epoch for r in self.rows)
        )

    def evaluate(self, G_A2B, G_B2A, epoch, step, seconds, device):
        """Translate both test domains (as test.py would write them), score them, append the row and return it."""
        row = {"epoch": epoch, "step": step, "seconds": round(seconds, 3)}
        for src, dst, G in (("A", "B", G_A2B), ("B", "A", G_B2A)):
            fake = translations(G, self.real[src], device)
            r = evaluate(
                fake, self.real[dst], cuda=device.type == "cuda", cache_name=self.cache[dst], weights=self.weights
            )
            row.update(
                {
                    f"fid_{src}2{dst}": r["fid"],
                    f"kid_{src}2{dst}": r["kid_mean"],
                    f"kid_std_{src}2{dst}": r["kid_std"],
                    "weights": r["weights"],
                }
            )
        append_row(self.path, COLUMNS, row)  # first: a row that is not on disk is not one of the run's
        self.rows.append(row)
        return row


@torch.inference_mode()
def translations(G, images, device):
    """G's translations of the decoded images, one at a time at their own size, in test.py's precision and layout:
    uint8 (C, H, W) on the CPU, the numbers test.py writes as PNG."""
    layout, autocast = precision(device)
    out = []
    for x in images:
        with autocast:
            y = translate(G, (x.float() / 255 * 2 - 1)[None].to(device, memory_format=layout))  # to_tensor's numbers
        out.append(to_uint8(y[0].float()).cpu())
    return out
