"""--d_scales K (multi-scale discriminators) and --load_size: K=1 is the paper's discriminator, module and keys; K=2
and 3 train, resume bit for bit after SIGKILL (K=2 runs under torchrun with --amp in tests/test_attention.py, with
--attention: one job for the suite's time); sizes that cannot fit are one line."""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import losses
import models
from conftest import FAST, ROOT, make_dataset, run_script
from test_resume import wait_for_checkpoint

pytestmark = pytest.mark.slow  # every test here trains or starts servers for seconds

train = __import__("importlib").import_module("train")
NETS = ("G_A2B", "G_B2A", "D_A", "D_B")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_A=4, n_B=3, size=(100, 104), test=False)


def test_one_scale_is_the_papers_discriminator_and_loads_the_seeds_files(tmp_path):
    args = train.get_parser().parse_args(["--n_blocks", "1", "--seed", "0"])
    run = train.build(args, torch.device("cpu"))
    assert type(run.nets["D_A"]) is models.Discriminator  # the same module, so the same numbers, as before K existed
    seed_layout = models.Discriminator(3).state_dict()  # the seed's keys: model.0 ... model.11
    assert (
        run.nets["D_A"].load_state_dict(seed_layout) is not None
        and run.nets["D_A"].state_dict().keys() == seed_layout.keys()
    )
    maps = [torch.rand(2, 1, 6, 6), torch.rand(2, 1, 2, 2)]
    assert torch.equal(losses.lsgan(maps, 1.0), (losses.lsgan(maps[0], 1.0) + losses.lsgan(maps[1], 1.0)) / 2)


def test_each_scale_sees_the_input_pooled_once_more():
    D = models.MultiScaleDiscriminator(3, 3)
    x = torch.randn(1, 3, 96, 96)
    maps = D(x)
    assert [m.shape[-1] for m in maps] == [10, 4, 1]  # 96, 48 and 24 px in
    once = torch.nn.functional.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
    assert torch.equal(maps[1], D.scales[1](once))


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--size", "32", "--d_scales", "2"], "--d_scales 2: at --size 32 from 1 to 1 scales fit"),
        (["--size", "64", "--d_scales", "3"], "--d_scales 3: at --size 64 from 1 to 2 scales fit"),
        (["--d_scales", "0"], "--d_scales 0"),
        (["--size", "64", "--load_size", "60"], "--load_size 60: from --size (64)"),
    ],
)
def test_scales_and_load_sizes_that_cannot_work_are_one_line(flags, words):
    with pytest.raises(train.UserError, match="^" + words.replace("(", r"\(").replace(")", r"\)")):
        train.check_args(train.get_parser().parse_args(flags))


def test_load_size_sets_the_side_before_the_crop(data):
    from datasets import ImageDataset

    assert ImageDataset(data, 48, load_size=96).side == 96 and ImageDataset(data, 48).side == 53
    assert ImageDataset(data, 48, load_size=96)[(0, 1)]["A"].shape == (3, 48, 48)


# K=2 at 48 px: the code is the same for any K >= 2 (K=3 is built and pooled above), and the suite has 10 minutes.
@pytest.mark.parametrize("scales, size", [(2, "48")])
def test_more_scales_train_and_resume_bit_for_bit_after_sigkill(data, tmp_path, scales, size):
    run = [
        "--dataroot",
        str(data),
        *FAST,
        "--size",
        size,
        "--d_scales",
        str(scales),
        "--load_size",
        size,
        "--save_freq",
        "2",
        "--display_freq",
        "1",
    ]  # one epoch of 4 steps, a checkpoint every 2
    r = run_script("train.py", *run, "--output_dir", tmp_path / "reference")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *run, "--output_dir", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_checkpoint(out, proc)
    time.sleep(random.uniform(0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run_script("train.py", "--resume", "--output_dir", out, "--d_scales", "3")
    assert r.returncode != 0 and "--d_scales 2 (given 3)" in r.stderr and "architecture" in r.stderr  # another K
    r = run_script("train.py", "--resume", "--output_dir", out)
    assert r.returncode == 0, r.stderr
    a, b = (torch.load(d / "checkpoint.pth", weights_only=True) for d in (out, tmp_path / "reference"))
    assert a["step"] == b["step"] == 4 and a["args"]["d_scales"] == scales
    for net in NETS:
        assert all(torch.equal(a[net][k], b[net][k]) for k in b[net]), net
    assert len([k for k in a["D_A"] if k.endswith("model.0.weight")]) == scales
