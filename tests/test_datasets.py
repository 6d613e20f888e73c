import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MIXED_MODES, make_dataset, write_image
from datasets import EpochSampler, ImageDataset, domain_dir, list_images, load_image, make_demo


@pytest.mark.parametrize("mode", MIXED_MODES + ["1", "P", "I", "F", "YCbCr"])
@pytest.mark.parametrize("nc", [1, 3])
def test_every_mode_becomes_rgb_or_l(tmp_path, mode, nc):
    path = tmp_path / ("x.jpg" if mode in ("CMYK", "YCbCr") else "x.tif" if mode in ("F", "I") else "x.png")
    if mode in ("1", "P", "I", "F", "YCbCr"):
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(mode).save(path)
    else:
        write_image(path, mode, (7, 9))
    img = load_image(path, nc)
    assert img.mode == ("L" if nc == 1 else "RGB") and img.size == (7, 9)


def test_16_bit_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert np.asarray(load_image(tmp_path / "g16.png", 1)).tolist() == [[0, 100, 255]]


def test_transparency_is_composited_over_white(tmp_path):
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png")).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 30)


def test_only_image_files_are_listed(tmp_path):
    for name in ("a.PNG", "b c.JpEg", "notes.txt", ".DS_Store", "d.webp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.PNG", "b c.JpEg", "d.webp"]


def test_both_layouts(tmp_path):
    seed, authors = make_dataset(tmp_path / "s", test=False), make_dataset(tmp_path / "a", layout="authors", test=False)
    assert domain_dir(seed, "train", "A") == seed / "train" / "A"
    assert domain_dir(authors, "train", "B") == authors / "trainB"


def test_user_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="python datasets.py demo"):
        domain_dir(tmp_path / "missing", "train", "A")
    (tmp_path / "train" / "A").mkdir(parents=True)
    with pytest.raises(ValueError, match="train/B"):
        domain_dir(tmp_path, "train", "B")
    with pytest.raises(ValueError, match="no image files"):
        list_images(tmp_path / "train" / "A")


def test_unaligned_items_are_a_pure_function_of_seed_epoch_index(tmp_path):
    root = make_dataset(tmp_path, n_A=3, n_B=5, modes=MIXED_MODES, test=False)
    ds = ImageDataset(root, 32, seed=7)
    assert len(ds) == 5  # max(|A|, |B|)
    item = ds[(2, 4)]
    assert item["A"].shape == item["B"].shape == (3, 32, 32)
    assert -1 <= item["A"].min() and item["A"].max() <= 1
    assert torch.equal(item["A"], ImageDataset(root, 32, seed=7)[(2, 4)]["A"])
    assert not torch.equal(item["B"], ds[(3, 4)]["B"]) or not torch.equal(item["A"], ds[(3, 4)]["A"])


def test_sampler_resumes_mid_epoch_and_shards():
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    assert sorted(i for _, i in full) == list(range(10)) and {e for e, _ in full} == {4}
    sampler.set_epoch(4, start=6)
    assert list(sampler) == full[6:] and len(sampler) == 4
    sampler.set_epoch(5)
    assert list(sampler) != [(5, i) for _, i in full]
    shards = [EpochSampler(10, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for s in shards:
        s.set_epoch(4)
    assert sorted(list(shards[0]) + list(shards[1])) == sorted(full)


def test_demo_has_paired_ground_truth(tmp_path):
    root = make_demo(tmp_path / "demo", size=24, n_train=3, n_test=2)
    assert len(list_images(root / "train" / "A")) == 3 and len(list_images(root / "test" / "truth_B")) == 2
    summer, winter = (np.asarray(Image.open(root / "test" / d / "0000.png"), dtype=float) for d in ("A", "truth_B"))
    assert winter.mean() > summer.mean() + 30  # snow is brighter than grass and a blue sky


def test_demo_objects_are_the_same_in_both_seasons_and_leave_the_rest_of_each_scene_as_it_was(tmp_path):
    plain = make_demo(tmp_path / "plain", size=24, n_train=1, n_test=3)
    root = make_demo(tmp_path / "objects", size=24, n_train=1, n_test=3, objects=True)
    for k in range(3):
        name = f"{k:04d}.png"
        summer, winter, before = (
            np.asarray(Image.open(r / "test" / d / name), dtype=int)
            for r, d in ((root, "A"), (root, "truth_B"), (plain, "A"))
        )
        keep = np.asarray(
            Image.open(root / "test" / "mask_A" / name)
        )  # black on the house: test.py --mask_dir keeps it
        house, elsewhere = keep == 0, keep == 255
        assert 4 < house.sum() < 0.25 * keep.size and house.sum() + elsewhere.sum() < keep.size  # soft edges between
        assert (summer[house] == winter[house]).all() and (summer[house] != before[house]).any()
        assert (summer[elsewhere] == before[elsewhere]).all()  # the same scene around it, drawn as without objects


def test_ranks_take_equal_shares_that_cover_the_epoch_and_resume_on_another_world_size():
    full = list(EpochSampler(7, seed=3))  # one process, epoch 0
    for world_size in (2, 3):
        shards = [list(EpochSampler(7, seed=3, rank=r, world_size=world_size)) for r in range(world_size)]
        assert len({len(s) for s in shards}) == 1  # padded: every rank takes the same number of steps
        assert set(sum(shards, [])) == set(full) and len(sum(shards, [])) == -(-7 // world_size) * world_size
    # 4 samples taken by 2 processes, then the rest by 3: the epoch continues where it stopped
    rest = []
    for r in range(3):
        s = EpochSampler(7, seed=3, rank=r, world_size=3)
        s.set_epoch(0, start=4)
        rest.append(list(s))
    assert sorted(set(sum(rest, []))) == sorted(full[4:]) and all(len(s) == 1 for s in rest)


def test_the_augmentation_equals_torchvisions_transforms(tmp_path):
    """datasets.py uses PIL directly (torchvision's import costs seconds of start-up): the same numbers."""
    import torchvision.transforms.functional as TF

    from datasets import resize_shorter_side, to_tensor

    for size, mode in (((57, 31), "RGB"), ((31, 57), "L"), ((36, 36), "RGB"), ((200, 120), "RGB")):
        img = Image.open(write_image(tmp_path / f"{size}{mode}.png", mode, size))
        for side in (26, 36, 143):
            ours, theirs = resize_shorter_side(img, side), TF.resize(img, side, TF.InterpolationMode.BICUBIC)
            assert ours.size == theirs.size and np.array_equal(np.asarray(ours), np.asarray(theirs)), (size, side)
        assert torch.equal(to_tensor(img), TF.to_tensor(img) * 2 - 1)
