"""Never lose a run: exact resume after SIGKILL or SIGTERM, safe checkpoint writes, NaN stops, safe loading."""

import csv
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST, ROOT, make_dataset, run_script

pytestmark = pytest.mark.slow  # every test here trains or starts servers for seconds

NETS = ("G_A2B", "G_B2A", "D_A", "D_B")
# 2 epochs of 6 steps at 24 px, a checkpoint every 2 steps.
RUN = [*FAST, "--size", "24", "--n_epochs", "2", "--decay_epoch", "1", "--save_freq", "2", "--display_freq", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("data"), n_A=6, n_B=3, size=(28, 30), modes=("RGB", "L", "RGBA"), test=False
    )


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    r = run_script("train.py", "--dataroot", data, "--output_dir", out, *RUN)
    assert r.returncode == 0, r.stderr
    return out


def assert_same_run(out, reference):
    a, b = (torch.load(d / "checkpoint.pth", weights_only=True) for d in (out, reference))
    assert a["step"] == b["step"] == 12
    for net in NETS:
        for k in b[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs"
    for opt in ("optimizer_G", "optimizer_D"):
        for i, state in b[opt]["state"].items():
            assert all(torch.equal(a[opt]["state"][i][k], v) for k, v in state.items()), opt
    for buf in ("fake_A_buffer", "fake_B_buffer"):  # one per process
        assert len(a[buf]) == len(b[buf]) == 1 and len(a[buf][0]["data"]) == len(b[buf][0]["data"])
        assert all(torch.equal(x, y) for x, y in zip(a[buf][0]["data"], b[buf][0]["data"]))
    assert loss_table(out) == loss_table(reference)


def loss_table(out):
    """losses.csv without the wall-clock column."""
    with open(out / "losses.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def start_training(data, out, *extra):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--dataroot", str(data), "--output_dir", str(out), *RUN, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_checkpoint(out, proc):
    while not (out / "checkpoint.pth").exists():
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)


# With loader workers; tests/test_epoch_end.py kills a run without them (and with evaluation, sheets and figures on).
@pytest.mark.parametrize("n_cpu", ["2"])
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(data, reference, tmp_path, n_cpu):
    out = tmp_path / "run"
    proc = start_training(data, out, "--n_cpu", n_cpu)
    wait_for_checkpoint(out, proc)
    time.sleep(random.uniform(0, 1.5))
    proc.kill()
    proc.wait()
    killed_at = torch.load(out / "checkpoint.pth", weights_only=True)["step"]
    r = run_script("train.py", "--resume", "--output_dir", out, "--n_cpu", n_cpu)
    assert r.returncode == 0, r.stderr
    assert ("resuming from" in r.stdout) == (killed_at < 12), r.stdout
    assert_same_run(out, reference)


def test_sigterm_saves_prints_the_resume_command_and_resumes_exactly(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_training(data, out)
    wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    step = torch.load(out / "checkpoint.pth", weights_only=True)["step"]
    if step < 12:  # the signal came before the run ended
        assert "SIGTERM" in stdout and f"--resume --output_dir {out}" in stdout
    r = run_script("train.py", "--resume", "--output_dir", out)
    assert r.returncode == 0, r.stderr
    assert_same_run(out, reference)


def test_resume_refuses_other_architecture_and_finished_runs(reference, tmp_path):
    r = run_script("train.py", "--resume", "--output_dir", reference, "--input_nc", "1")
    assert r.returncode != 0 and "--input_nc 3 (given 1)" in r.stderr and "architecture" in r.stderr
    r = run_script("train.py", "--resume", "--output_dir", reference, "--lr", "0.001")
    assert r.returncode != 0 and "other training flags: --lr 0.0002 (given 0.001)" in r.stderr
    r = run_script("train.py", "--resume", "--output_dir", reference)
    assert r.returncode == 0 and "all 2 epochs of this run are done" in r.stdout


def test_resume_with_more_epochs_trains_longer(reference, tmp_path):
    out = tmp_path / "longer"
    shutil.copytree(reference, out)
    r = run_script("train.py", "--resume", "--output_dir", out, "--n_epochs", "3")
    assert r.returncode == 0, r.stderr
    assert "resuming from epoch 3, step 12" in r.stdout and "done: 3 epochs, 18 steps" in r.stdout
    assert torch.load(out / "checkpoint.pth", weights_only=True)["args"]["size"] == 24  # the run's flags kept
    r = run_script("train.py", "--dataroot", "anything", "--output_dir", reference, "--epoch", "1")
    assert r.returncode != 0 and "--resume" in r.stderr and "Traceback" not in r.stderr


def test_a_failed_write_keeps_the_previous_checkpoint(data, tmp_path):
    """The disk fills up after the first checkpoint: later writes fail half-way, the first stays loadable."""
    out = tmp_path / "run"
    code = f"""
import errno, runpy, sys, torch
real_save, calls = torch.save, []
def disk_full(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and "optimizer_G" in obj:
        calls.append(1)
        if len(calls) > 1:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)
torch.save = disk_full
sys.path.insert(0, {str(ROOT)!r})
sys.argv = ["train.py"] + {["--dataroot", str(data), "--output_dir", str(out), *RUN]!r}
runpy.run_path({str(ROOT / "train.py")!r}, run_name="__main__")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "No space left on device" in r.stderr and "previous file is intact" in r.stderr
    assert "Traceback" not in r.stderr
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 2
    assert not list(out.glob("*.tmp"))


def test_nan_stops_with_the_loss_and_step_and_keeps_the_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    r = run_script("train.py", "--dataroot", data, "--output_dir", out, *RUN, "--lr", "1e30", "--save_freq", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "loss_G became nan at step 2" in r.stderr
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 1


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


PWNED = ""


def test_a_checkpoint_that_runs_code_on_load_is_refused(tmp_path):
    global PWNED
    PWNED = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"G_A2B": Exploit(), "args": {}}, evil, pickle_module=pickle)
    for script, flag in (("train.py", "--resume"), ("test.py", "--generator_A2B")):
        r = run_script(script, flag, evil, "--output_dir", tmp_path / "o")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, (
            r.stderr
        )  # one line, no advice to unpickle
        assert "holds pickled Python objects besides tensors (posix.system), refused unread" in r.stderr
        assert "weights_only" not in r.stderr
    assert not PWNED.exists()
