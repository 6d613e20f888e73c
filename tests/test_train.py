import csv
import math

import pytest
import torch

from conftest import FAST, make_dataset, run_script
from models import Discriminator, Generator


@pytest.mark.slow
def test_a_few_steps_on_mixed_modes_write_seed_files_and_a_full_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "out"
    r = run_script("train.py", "--dataroot", tiny_data, "--output_dir", out, *FAST, "--n_blocks", "9")  # the paper's
    assert r.returncode == 0, r.stderr
    assert "done: 1 epochs, 3 steps" in r.stdout
    # The seed's own loading code: a plain state_dict per network.
    for name, net in (
        ("netG_A2B", Generator(3, 3)),
        ("netG_B2A", Generator(3, 3)),
        ("netD_A", Discriminator(3)),
        ("netD_B", Discriminator(3)),
    ):
        net.load_state_dict(torch.load(out / f"{name}.pth", weights_only=True))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["args"]["seed"] == 0
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["G_A2B"])
    with open(out / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["step"]) for r in rows] == [3.0]
    assert all(math.isfinite(float(rows[0][k])) for k in ("loss_G", "loss_D", "loss_G_cycle", "lr"))


@pytest.mark.slow
def test_batches_and_grayscale_and_the_authors_layout(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=5, n_B=3, layout="authors", modes=("L", "RGB"), test=False)
    r = run_script(
        "train.py",
        "--dataroot",
        data,
        "--output_dir",
        tmp_path / "o",
        *FAST,
        "--batchSize",
        "2",
        "--input_nc",
        "1",
        "--output_nc",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "3 steps" in r.stdout  # ceil(5 / 2)
    Generator(1, 1, n_residual_blocks=1).load_state_dict(torch.load(tmp_path / "o" / "netG_A2B.pth", weights_only=True))


@pytest.mark.slow
def test_learning_rate_decays_linearly_after_decay_epoch(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=1, n_B=1, test=False)
    r = run_script(
        "train.py",
        "--dataroot",
        data,
        "--output_dir",
        tmp_path / "o",
        *FAST,
        "--n_epochs",
        "4",
        "--decay_epoch",
        "2",
        "--lr",
        "0.001",
    )
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "o" / "losses.csv") as f:
        assert [float(row["lr"]) for row in csv.DictReader(f)] == pytest.approx(
            [0.001, 0.001, 0.001, 0.0005]
        )  # the seed: 1 - (e - 2) / 2


@pytest.mark.slow
def test_different_channel_counts_need_identity_off(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=2, n_B=2, modes=("RGB", "L"), test=False)
    args = ["--dataroot", data, "--output_dir", tmp_path / "o", *FAST, "--input_nc", "3", "--output_nc", "1"]
    r = run_script("train.py", *args)
    assert r.returncode != 0 and "--lambda_identity 0" in r.stderr and "Traceback" not in r.stderr
    r = run_script("train.py", *args, "--lambda_identity", "0")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow  # a process per case: seconds each
@pytest.mark.parametrize(
    "case,flags,message",
    [
        ("missing root", ["--dataroot", "{tmp}/nowhere"], "python datasets.py demo"),
        ("empty domain", ["--dataroot", "{tmp}/empty"], "holds no image files"),
        ("missing domain", ["--dataroot", "{tmp}/half"], "train/B"),
        ("decay", ["--n_epochs", "5", "--decay_epoch", "5"], "--decay_epoch (5) must be"),
        ("size", ["--size", "30"], "multiple of 4"),
        ("cuda", ["--cuda"], "drop --cuda"),
        ("resume nothing", ["--resume"], "no checkpoint at"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, tiny_data, case, flags, message):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    (tmp_path / "empty" / "train" / "A").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "B").mkdir(parents=True)
    make_dataset(tmp_path / "half", test=False)
    for d in (tmp_path / "half" / "train" / "B").iterdir():
        d.unlink()
    (tmp_path / "half" / "train" / "B").rmdir()
    flags = [f.format(tmp=tmp_path) for f in flags]
    r = run_script("train.py", "--dataroot", tiny_data, "--output_dir", tmp_path / "o", *FAST, *flags)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
