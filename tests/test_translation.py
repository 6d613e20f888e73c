"""Photos of any size: translation in tiles is exact (the same numbers as the whole image, to float rounding) for odd
sizes, tiles smaller than the halo and attention generators, where naive per-tile normalisation leaves seams; test.py
--tile, the automatic tiling of an image that does not fit, translate_image(tile=), and memory bounded by the tiles."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import models
import translation
from conftest import ROOT, run_script


def generator(kind="plain", blocks=2, seed=0):
    torch.manual_seed(seed)
    G = models.AttentionGenerator(3, blocks) if kind == "attention" else models.Generator(3, 3, blocks)
    return G.apply(models.weights_init_normal).eval()


@pytest.mark.parametrize(
    "kind, h, w, tile",
    [("plain", 37, 50, 16), ("plain", 21, 18, 4), ("attention", 45, 31, 8), ("plain", 64, 96, 1000)],
)
def test_tiles_give_the_whole_images_numbers(kind, h, w, tile):
    G = generator(kind)
    x = torch.rand(2, 3, h, w) * 2 - 1
    whole, whole_map = translation.translate(G, x, attention=True)
    tiled, tiled_map = translation.translate(G, x, attention=True, tile=tile)
    assert tiled.shape == whole.shape and (tiled - whole).abs().max() < 1e-4
    assert (tiled_map is None) == (whole_map is None) == (kind == "plain")
    if kind == "attention":
        assert (tiled_map - whole_map).abs().max() < 1e-4
    assert all(norm.stats is None for norm in translation.norms(G))  # G is left as it was


def test_tiles_each_with_its_own_statistics_show_seams():
    """The naive way (each tile, with the same halo, normalised by its own statistics) is what the shared statistics
    fix: it is far from the whole image's result."""
    G, x = generator(), translation.pad(torch.rand(1, 3, 64, 64) * 2 - 1)
    whole = G(x)
    naive = torch.empty_like(whole)
    with torch.inference_mode():
        for crop, core in translation.windows(64, 64, 16):
            out = G(translation.cut(x, crop))
            translation.cut(naive, core).copy_(translation.cut(out, translation.relative(crop, core)))
    assert (naive - whole).abs().max() > 0.05


def test_translate_image_in_tiles_gives_the_same_pixels(tmp_path):
    G = generator(blocks=1)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    whole = np.asarray(translation.translate_image(G, image), dtype=int)
    tiled = np.asarray(translation.translate_image(G, image, tile=12), dtype=int)
    assert np.abs(whole - tiled).max() <= 1 and (whole != tiled).mean() < 0.01  # float rounding at a .5 grey level


def load_test_script():
    spec = importlib.util.spec_from_file_location("cyclegan_test_script", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_image_that_does_not_fit_whole_is_translated_in_tiles(tmp_path, monkeypatch, capsys):
    torch.save(generator(blocks=1).state_dict(), tmp_path / "G.pth")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    script = load_test_script()
    flags = ["--input", str(tmp_path / "x.png"), "--generator", str(tmp_path / "G.pth"), "--n_cpu", "0"]
    assert script.main(script.get_parser().parse_args([*flags, "--output_dir", str(tmp_path / "whole")])) == 0
    monkeypatch.setattr(script, "free_pixels", lambda device: 3000)  # fits tiled (400 B a px), not whole (1000)
    monkeypatch.setattr(script, "AUTO_TILE", 16)
    assert script.main(script.get_parser().parse_args([*flags, "--output_dir", str(tmp_path / "tiled")])) == 0
    assert (
        "x.png: 90x60 px does not fit whole in the free memory: translated in tiles of 16 px" in capsys.readouterr().out
    )
    whole, tiled = (np.asarray(Image.open(tmp_path / d / "B" / "x.png"), dtype=int) for d in ("whole", "tiled"))
    assert np.abs(whole - tiled).max() <= 1 and (whole != tiled).mean() < 0.01


PEAK = """
import sys, torch
sys.path.insert(0, {root!r})
import models, translation

def high_water():  # this process's peak RSS in MiB (VmHWM: unlike ru_maxrss, not inherited from pytest at the fork)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024

torch.manual_seed(0)
G = models.Generator(3, 3, 2).apply(models.weights_init_normal).eval()
x = torch.rand(1, 3, 768, 768) * 2 - 1
before = high_water()
translation.translate(G, x, tile={tile})
print(high_water() - before)
"""


@pytest.mark.slow
def test_tiles_take_less_memory_than_the_whole_image():
    """Measures the tensors alive at once, not the allocator: at this small size every tile's tensor is under glibc's
    dynamic mmap threshold (up to 32 MiB), so freed tiles stay in the heap, fragmented, by an amount that depends on
    the thread count (seen: 200 MiB live, 347-670 MiB of heap with one thread). A fixed threshold maps and unmaps each
    tensor. A real photo's tiles (512 px) are above 32 MiB and mapped anyway (docs/performance.md)."""
    peak = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for tile in (None, 256):
        code = PEAK.format(root=str(ROOT), tile=tile)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        peak[tile] = int(r.stdout.split()[-1])  # MiB above what torch and the inputs took
    assert peak[256] < 0.6 * peak[None], peak


@pytest.mark.slow
def test_test_py_tile_flag_writes_the_same_pngs(tmp_path):
    torch.save(generator(blocks=1).state_dict(), tmp_path / "G.pth")
    for k, (h, w) in enumerate([(33, 47), (64, 20)]):
        pixels = np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{k}.png")
    for out, extra in (("whole", []), ("tiled", ["--tile", "8"])):
        r = run_script("test.py", "--input", tmp_path, "--generator", tmp_path / "G.pth", "--output_dir",
                       tmp_path / out, "--n_cpu", "0", *extra)  # fmt: skip
        assert r.returncode == 0, r.stderr
    for k in range(2):
        whole, tiled = (np.asarray(Image.open(tmp_path / d / "B" / f"{k}.png"), dtype=int) for d in ("whole", "tiled"))
        assert np.abs(whole - tiled).max() <= 1 and (whole != tiled).mean() < 0.01
