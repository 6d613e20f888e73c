"""torchrun + DistributedDataParallel on the CPU (gloo, 2 processes): ranks stay in step and nothing is lost."""

import contextlib
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, make_dataset
from models import Discriminator, Generator

pytestmark = pytest.mark.slow  # every test here trains or starts servers for seconds

NETS = ("G_A2B", "G_B2A", "D_A", "D_B")
RUN = [*FAST, "--size", "24", "--display_freq", "1"]
LONG = [*RUN, "--n_epochs", "3", "--decay_epoch", "1", "--save_freq", "2"]  # 3 epochs of 2 steps on 2 processes

# Patches train.py the way a test asks, then runs it as torchrun's script. argv: ROOT MODE OUT_FILE train-args...
WRAPPER = r"""
import hashlib, os, runpy, sys
root, mode, out_file = sys.argv[1:4]
sys.path.insert(0, root)
import report
from torch.optim.optimizer import register_optimizer_step_post_hook
rank = int(os.environ["RANK"])
if mode == "hash":  # a digest of every weight after each step, one file per rank
    optimizers, log = [], open(f"{out_file}.{rank}", "w")
    def after(optimizer, args, kwargs):
        if optimizer not in optimizers:
            optimizers.append(optimizer)
        if optimizer is optimizers[-1] and len(optimizers) == 2:  # the discriminators' update ends a step
            h = hashlib.sha256()
            for group in optimizers[0].param_groups + optimizers[1].param_groups:
                for p in group["params"]:
                    h.update(p.detach().cpu().numpy().tobytes())
            log.write(h.hexdigest() + "\n")
            log.flush()
    register_optimizer_step_post_hook(after)
elif mode == "raise" and rank == 1:
    step, calls = report.Logger.step, []
    def broken(self, losses):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure on rank 1")
        return step(self, losses)
    report.Logger.step = broken
elif mode == "tiny":  # FID/KID with the tests' tiny feature extractor in place of Inception
    sys.path.insert(0, root + "/tests")
    import metrics, test_metrics
    metrics.EXTRACTOR = test_metrics.TINY
sys.argv = [root + "/train.py"] + sys.argv[4:]
try:
    runpy.run_path(root + "/train.py", run_name="__main__")
except SystemExit as e:  # each rank's exit status, for the test to read
    if mode == "exit":
        open(f"{out_file}.{rank}", "w").write(str(e.code))
    raise
"""


def torchrun(tmp_path, n, *args, mode="none", out_file="", background=False):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        str(wrapper),
        str(ROOT),
        mode,
        str(out_file),
        *map(str, args),
    ]
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home")}  # FID's cached features of the real images
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def kill_tree(pid):
    """SIGKILL pid and every process below it, as a crash of the machine or a scheduler's kill would: torchrun
    starts each rank in a session of its own, so killing its process group would not reach them."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError):
            pass
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def states(out):
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    return ckpt, {net: ckpt[net] for net in NETS}


def loss_rows(out):
    with open(out / "losses.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_A=4, n_B=3, size=(28, 30), modes=("RGB", "L"), test=False)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """2 processes x batch 1 on 2 A images (one step), replay buffers off; FID/KID and a sample sheet at the end."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_dataset(tmp / "data", n_A=2, n_B=2, size=(28, 30), modes=("RGB", "L"))
    r = torchrun(
        tmp,
        2,
        "--dataroot",
        data,
        "--output_dir",
        tmp / "out",
        *RUN,
        "--pool_size",
        "0",
        "--eval_freq",
        "1",
        "--n_samples",
        "1",
        mode="tiny",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp, data, r


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 2-process run of 6 steps, with a digest of the weights on each rank after every step."""
    tmp = tmp_path_factory.mktemp("reference")
    r = torchrun(tmp, 2, "--dataroot", data, "--output_dir", tmp / "out", *LONG, mode="hash", out_file=tmp / "weights")
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp


def test_a_torchrun_run_writes_one_set_of_files(one_step):
    tmp, _, r = one_step
    out = tmp / "out"
    assert r.stdout.count("new run, seed 0, 2 processes") == 1 and r.stdout.count("done: 1 epochs, 1 steps") == 1
    for name, net in (
        ("netG_A2B", Generator(3, 3, 1)),
        ("netG_B2A", Generator(3, 3, 1)),
        ("netD_A", Discriminator(3)),
        ("netD_B", Discriminator(3)),
    ):
        net.load_state_dict(torch.load(out / f"{name}.pth", weights_only=True))
    ckpt, _ = states(out)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == len(ckpt["fake_A_buffer"]) == 2
    assert [row["step"] for row in loss_rows(out)] == ["1"]  # one writer
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            ".lock",
            "checkpoint.pth",
            "losses.csv",
            "metrics.csv",
            "netD_A.pth",
            "netD_B.pth",
            "netG_A2B.pth",
            "netG_B2A.pth",
            "samples",
        ]
    )
    assert r.stdout.count("epoch 1: FID A2B") == 1 and len((out / "metrics.csv").read_text().splitlines()) == 2
    assert [p.name for p in (out / "samples").iterdir()] == ["epoch_001.png"]


def test_ranks_hold_identical_weights_after_every_step(reference):
    digests = [(reference / f"weights.{rank}").read_text().split() for rank in (0, 1)]
    assert len(digests[0]) == 6 and digests[0] == digests[1] and len(set(digests[0])) == 6


def test_two_ranks_of_batch_1_equal_one_process_of_batch_2(one_step, tmp_path):
    """One step: the losses, and the gradients (Adam's first moment after one step is 0.5 * gradient).

    The discriminators' gradients agree to 1e-7. The generators' agree to ~3e-3 only: in float32 their first layers'
    gradients carry ~1e-3 of rounding (InstanceNorm's backward subtracts near-equal means), and convolutions of batch 1
    and of batch 2 round differently; in float64 the two agree to 1e-16."""
    tmp, data, _ = one_step
    one = tmp_path / "one"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--dataroot",
            str(data),
            "--output_dir",
            str(one),
            *RUN,
            "--pool_size",
            "0",
            "--batchSize",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (ddp, _), (single, _) = states(tmp / "out"), states(one)
    for opt, tolerance in (("optimizer_D", 1e-5), ("optimizer_G", 1e-2)):
        for i, state in single[opt]["state"].items():
            a, b = ddp[opt]["state"][i]["exp_avg"], state["exp_avg"]
            if b.norm() > 1e-3:  # not a bias before an InstanceNorm, whose gradient is rounding only
                assert ((a - b).norm() / b.norm()).item() <= tolerance, (opt, i)
    for a, b in zip(loss_rows(tmp / "out"), loss_rows(one)):
        assert all(abs(float(a[k]) - float(b[k])) <= 1e-5 * abs(float(b[k])) + 1e-7 for k in a), (a, b)


def test_sigkill_of_the_job_then_resume_on_2_processes_is_exact_and_on_1_finishes(data, reference, tmp_path):
    out = tmp_path / "killed"
    proc = torchrun(tmp_path, 2, "--dataroot", data, "--output_dir", out, *LONG, background=True)
    wait_for_checkpoint(out, proc)
    time.sleep(random.uniform(0, 2))
    kill_tree(proc.pid)
    proc.wait()
    killed_at = torch.load(out / "checkpoint.pth", weights_only=True)["step"]
    shutil.copytree(out, tmp_path / "on1")

    r = torchrun(tmp_path, 2, "--resume", "--output_dir", out)
    assert r.returncode == 0, r.stdout + r.stderr
    (a, nets_a), (b, nets_b) = states(out), states(reference / "out")
    assert a["step"] == b["step"] == 6
    for net in NETS:
        assert all(torch.equal(nets_a[net][k], v) for k, v in nets_b[net].items()), net
    for k in ("fake_A_buffer", "fake_B_buffer"):
        assert all(torch.equal(x, y) for ra, rb in zip(a[k], b[k]) for x, y in zip(ra["data"], rb["data"]))
    assert loss_rows(out) == loss_rows(reference / "out")

    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--resume", "--output_dir", str(tmp_path / "on1")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    if killed_at < 6:
        assert "the run had 2 process(es), this one has 1" in r.stdout
    c, _ = states(tmp_path / "on1")
    # A kill that came after the job had finished leaves its last checkpoint, which the 1-process resume only reads.
    assert c["position"] == [3, 0] and c["world_size"] == (1 if killed_at < 6 else 2)
    rows = loss_rows(tmp_path / "on1")
    assert rows[:killed_at] == loss_rows(reference / "out")[:killed_at] and float(rows[-1]["epoch"]) == 3.0


def wait_for_checkpoint(out, proc):
    while not (out / "checkpoint.pth").exists():
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_saves_once_and_resumes_exactly(
    data, reference, tmp_path
):
    out = tmp_path / "run"
    proc = torchrun(
        tmp_path,
        2,
        "--dataroot",
        data,
        "--output_dir",
        out,
        *LONG,
        mode="exit",
        out_file=tmp_path / "exit",
        background=True,
    )
    wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to each rank's process group
    stdout, _ = proc.communicate(timeout=120)
    assert [(tmp_path / f"exit.{rank}").read_text() for rank in (0, 1)] == ["0", "0"], stdout
    step = torch.load(out / "checkpoint.pth", weights_only=True)["step"]
    if step < 6:
        assert stdout.count(f"stopped at step {step}; continue with") == 1, stdout
        assert "torchrun --nproc_per_node=2 train.py --resume" in stdout
    r = torchrun(tmp_path, 2, "--resume", "--output_dir", out)
    assert r.returncode == 0, r.stdout + r.stderr
    (_, nets_a), (_, nets_b) = states(out), states(reference / "out")
    for net in NETS:
        assert all(torch.equal(nets_a[net][k], v) for k, v in nets_b[net].items()), net
    assert loss_rows(out) == loss_rows(reference / "out")


def test_one_rank_failing_ends_the_whole_job_quickly(data, tmp_path):
    start = time.time()
    r = torchrun(
        tmp_path,
        2,
        "--dataroot",
        data,
        "--output_dir",
        tmp_path / "out",
        *RUN,
        "--n_epochs",
        "20",
        "--decay_epoch",
        "1",
        mode="raise",
    )
    assert r.returncode != 0 and "injected failure on rank 1" in r.stdout + r.stderr
    assert time.time() - start < 30 + 20  # + start-up of two processes on a loaded 2-core machine
