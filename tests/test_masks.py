"""test.py --mask_dir: exact outside the masks, equal to the unmasked output inside them, blended between; masks of
another size, missing and unreadable ones cost one line; both layouts; the page shows the mask."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_dataset, run_script
from test_metrics import small_generators as generators


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)


@pytest.mark.slow
def test_masks_keep_translate_and_blend_exactly(tmp_path):
    data = make_dataset(tmp_path / "data", n_A=4, n_B=2, size=(40, 36), modes=("RGB", "RGBA"))
    nets = generators(tmp_path / "nets")
    common = [
        "--dataroot",
        data,
        "--generator_A2B",
        nets / "netG_A2B.pth",
        "--generator_B2A",
        nets / "netG_B2A.pth",
        "--n_cpu",
        "0",
    ]
    assert run_script("test.py", *common, "--output_dir", tmp_path / "plain").returncode == 0
    names = sorted(p.stem for p in (data / "test" / "A").iterdir())
    masks = tmp_path / "masks"
    masks.mkdir()
    half = np.zeros((36, 40), np.uint8)
    half[:, 20:] = 255  # right half translated, left half kept
    half[:4, :4] = 128  # and a grey corner, blended
    Image.fromarray(half).save(masks / f"{names[0]}.png")
    Image.fromarray(np.full((9, 10), 255, np.uint8)).save(masks / f"{names[1]}.jpg")  # another size: resized
    (masks / f"{names[2]}.png").write_text("not an image")  # unreadable: translated whole, one line
    r = run_script("test.py", *common, "--output_dir", tmp_path / "masked", "--mask_dir", masks)  # names[3]: none
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("are resized to it") == 1 and r.stderr.count("cannot be read") == 1
    assert r.stderr.count("no mask named") == 1  # names[3]; test/B's images share test/A's names: masked too
    out, plain = tmp_path / "masked", tmp_path / "plain"
    x, y, g = (pixels(d / f"{names[0]}.png") for d in (out / "real_A", out / "B", plain / "B"))
    assert np.array_equal(y[4:, :20], x[4:, :20]) and np.array_equal(y[:, 20:], g[:, 20:])  # kept / translated
    assert np.array_equal(y[:4, :4], np.round(128 / 255 * g[:4, :4] + (1 - 128 / 255) * x[:4, :4]))
    for name in names[1:]:  # resized all-white, unreadable, missing: the unmasked translation
        assert np.array_equal(pixels(out / "B" / f"{name}.png"), pixels(plain / "B" / f"{name}.png"))
    assert Image.open(out / "mask_A" / f"{names[0]}.png").size == (40, 36)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert f"mask_A/{names[0]}.png" in page and "<th>mask</th>" in page


@pytest.mark.slow
def test_masks_with_an_input_folder_and_their_mistakes(tmp_path):
    data = make_dataset(tmp_path / "data", n_A=2, n_B=1, size=(32, 28))
    nets = generators(tmp_path / "nets")
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in (data / "test" / "A").iterdir():
        Image.fromarray(np.zeros((28, 32), np.uint8)).save(masks / f"{p.stem}.png")  # keep everything
    r = run_script(
        "test.py",
        "--input",
        data / "test" / "A",
        "--generator",
        nets / "netG_A2B.pth",
        "--n_cpu",
        "0",
        "--output_dir",
        tmp_path / "out",
        "--mask_dir",
        masks,
    )
    assert r.returncode == 0, r.stderr
    for p in (data / "test" / "A").iterdir():
        assert np.array_equal(
            pixels(tmp_path / "out" / "B" / f"{p.stem}.png"), pixels(tmp_path / "out" / "real_A" / f"{p.stem}.png")
        )
    for extra, words in (
        (["--mask_dir", tmp_path / "nowhere"], "is not a folder"),
        (["--mask_dir", masks, "--output_nc", "1"], "needs --input_nc == --output_nc"),
    ):
        r = run_script(
            "test.py",
            "--input",
            data / "test" / "A",
            "--generator",
            nets / "netG_A2B.pth",
            "--output_dir",
            tmp_path / "bad",
            *extra,
        )
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_mask_at_twice_its_images_size_stays_hard(tmp_path):
    """Area averaging, not bilinear: a hard mask at a whole multiple of its image's size comes back hard, in place."""
    spec = importlib.util.spec_from_file_location("cyclegan_test_script", ROOT / "test.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    small = np.zeros((16, 20), np.uint8)
    small[:, 7:] = 255  # the boundary at an odd column: bilinear's samples straddle it
    Image.fromarray(small).resize((40, 32), Image.NEAREST).save(tmp_path / "x.png")
    real = torch.randint(0, 256, (3, 16, 20), dtype=torch.uint8)
    blend, m = script.Masks(tmp_path, 3, 3).apply(Path("x.png"), real, 255 - real)
    assert np.array_equal(m[0].numpy(), small) and torch.equal(blend[:, :, :7], real[:, :, :7])
