"""Files a real training folder holds: odd modes, broken images, and files that are not images at all."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import FAST, run_script, write_image
from datasets import EpochSampler, ImageDataset, format_bad, readable_images


def truncated_jpeg(path, seed=0):
    """A JPEG cut in half, as a download cut short leaves it: its header opens, decoding raises."""
    write_image(path, "RGB", (40, 36), seed=seed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def exif_rotated_jpeg(path):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (36, 40, 3), dtype=np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(path, exif=exif)
    return path


def messy_data(root):
    """train/A and train/B with every mode users meet, one truncated JPEG, two files that cannot be images,
    and desktop clutter. Returns (root, {names that must be reported})."""
    A, B = root / "train" / "A", root / "train" / "B"
    write_image(A / "cmyk.jpg", "CMYK")
    write_image(A / "deep16.png", "I;16")
    write_image(A / "deep16.tif", "I;16")
    write_image(A / "gray alpha.png", "LA")
    write_image(A / "palette.png", "P+transparency")
    exif_rotated_jpeg(A / "rotated.jpg")
    truncated_jpeg(A / "truncated.jpg")
    write_image(A / "plain.png", "RGB", seed=2)
    write_image(A / "small.png", "RGB", (20, 17), seed=3)  # smaller than the crop: scaled up
    (A / "empty.png").write_bytes(b"")
    for i in range(9):
        write_image(B / f"winter {i}.png", "RGB", seed=10 + i)
    (B / "notes.jpg").write_text("not a picture\n")
    for folder in (A, B):
        (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(60))
        (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(40))
    return root, {"truncated.jpg", "empty.png", "notes.jpg"}


@pytest.mark.slow
@pytest.mark.parametrize("n_cpu", ["0", "2"])
def test_an_epoch_on_a_messy_folder_reports_exactly_the_bad_files(tmp_path, n_cpu):
    root, bad = messy_data(tmp_path / "data")
    r = run_script(
        "train.py", "--dataroot", root, "--output_dir", tmp_path / "out", *FAST, "--n_cpu", n_cpu, "--size", "24"
    )
    assert r.returncode == 0, r.stderr
    assert "done: 1 epochs, 9 steps" in r.stdout  # |A| = |B| = 9 readable files (the truncated one counts)
    output = r.stdout + r.stderr
    for path in (tmp_path / "data" / "train").glob("*/*"):
        assert (str(path) in output) == (path.name in bad), (path.name, output)
    assert output.count(str(root / "train" / "A" / "truncated.jpg")) == 1  # reported once, in the main process
    assert "cannot be decoded" in output and "Traceback" not in output


def test_a_mostly_unreadable_domain_stops_before_training_with_the_list(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        write_image(root / "train" / "A" / f"a{i}.png", "RGB", seed=i)
        write_image(root / "train" / "B" / f"b{i}.png", "RGB", seed=i)
    (root / "train" / "B" / "zero.png").write_bytes(b"")
    (root / "train" / "B" / "text.jpg").write_text("hello")
    r = run_script("train.py", "--dataroot", root, "--output_dir", tmp_path / "out", *FAST)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: 2 of 5 image files in") and "cannot be read (more than 10%)" in r.stderr
    assert f"{root / 'train' / 'B' / 'zero.png'}: empty file" in r.stderr
    assert f"{root / 'train' / 'B' / 'text.jpg'}: not an image file" in r.stderr
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_the_list_is_capped_and_mac_metadata_files_do_not_count(tmp_path):
    assert format_bad([(f"f{i}", "r") for i in range(25)]).splitlines()[-2:] == ["  f19: r", "  and 5 more"]
    for i in range(4):
        write_image(tmp_path / f"p{i}.jpg", "RGB", seed=i)
        (tmp_path / f"._p{i}.jpg").write_bytes(bytes.fromhex("00051607") + bytes(80))  # AppleDouble
    files, skipped = readable_images(tmp_path)
    assert [p.name for p in files] == [f"p{i}.jpg" for i in range(4)]
    assert [(p.name, r) for p, r in skipped][0] == ("._p0.jpg", "macOS metadata (AppleDouble) file, not an image")


def test_a_file_that_fails_to_decode_is_replaced_by_a_function_of_seed_epoch_index(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        write_image(root / "train" / "A" / f"a{i}.png", "RGB", seed=i)
        write_image(root / "train" / "B" / f"b{i}.png", "RGB", seed=10 + i)
    broken = truncated_jpeg(root / "train" / "A" / "a1 cut.jpg")
    ds = ImageDataset(root, 32, seed=5)
    key = (1, ds.files_A.index(broken))
    item = ds[key]
    assert item["bad"].startswith(f"{broken}: cannot be decoded (OSError") and item["A"].shape == (3, 32, 32)
    assert ds[(1, 0)]["bad"] == ""

    fresh = ImageDataset(root, 32, seed=5)
    for i in range(len(fresh)):  # what this process saw before must not matter
        fresh[(0, i)]
    again = fresh[key]
    assert torch.equal(again["A"], item["A"]) and torch.equal(again["B"], item["B"]) and again["bad"] == item["bad"]

    streams = []
    for workers in (0, 2):
        sampler = EpochSampler(len(ds), seed=5)
        sampler.set_epoch(1)
        batches = list(DataLoader(ImageDataset(root, 32, seed=5), batch_size=1, sampler=sampler, num_workers=workers))
        streams.append(batches)
        assert sum(bool(b["bad"][0]) for b in batches) == 1
    for a, b in zip(*streams):
        assert torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"]) and a["bad"] == b["bad"]
