"""Shared fixtures: tiny image folders in every PIL mode, and a runner for the repository's scripts."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_image(path, mode, size=(40, 36), seed=0):
    """One image file of the given PIL mode with random content; returns its path."""
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "P+transparency":
        img = Image.fromarray(rgb).convert("P")
        img.info["transparency"] = 0
    else:
        img = Image.fromarray(rgb).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **({"transparency": 0} if mode == "P+transparency" else {}))
    return path


MIXED_MODES = ["RGB", "L", "LA", "RGBA", "P+transparency", "I;16", "CMYK"]


def make_dataset(root, n_A=3, n_B=2, size=(40, 36), modes=("RGB",), layout="seed", test=True):
    """A tiny unaligned data set; `modes` cycle over the files. layout: 'seed' (train/A) or 'authors' (trainA)."""
    root = Path(root)
    k = 0
    for split in ("train", "test") if test else ("train",):
        for domain, n in (("A", n_A), ("B", n_B)):
            folder = root / split / domain if layout == "seed" else root / f"{split}{domain}"
            for i in range(n):
                mode = modes[k % len(modes)]
                ext = "jpg" if mode == "CMYK" else "png"
                write_image(folder / f"img {i} {mode.replace(';', '').replace('+', '_')}.{ext}", mode, size, seed=k)
                k += 1
    return root


def run_script(script, *args, cwd=None, timeout=300, env=None):
    """Run one of the repository's scripts in a subprocess (test.py must not be imported: it shadows stdlib test)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tiny_data(tmp_path):
    return make_dataset(tmp_path / "data", modes=MIXED_MODES)


# Flags that make train.py take a few seconds: 32 px crops, 1 epoch of max(|A|, |B|) steps, generators with one
# residual block (checkpoints of 110 MB, not 340), no visdom.
# --no_figures: each epoch end would start a process drawing plots/ (tests/test_figures.py and test_epoch_end.py do)
QUICK = [
    "--size",
    "32",
    "--n_epochs",
    "1",
    "--decay_epoch",
    "0",
    "--n_cpu",
    "0",
    "--seed",
    "0",
    "--n_blocks",
    "1",
    "--no_figures",
]
FAST = QUICK + ["--no_visdom"]


def before_instance_norm(net):
    """Names of the conv biases that an InstanceNorm follows: it subtracts their effect again, so their gradient is
    0 up to rounding, and Adam (which divides by the gradient's size) turns that rounding into steps of +-lr."""
    names = []
    for prefix, module in net.named_modules():
        if isinstance(module, nn.Sequential):
            for (i, a), (_, b) in zip(module.named_children(), list(module.named_children())[1:]):
                if isinstance(a, nn.Conv2d | nn.ConvTranspose2d) and isinstance(b, nn.InstanceNorm2d):
                    names.append(f"{prefix}.{i}.bias".lstrip("."))
    return names
