"""No error can hang train.py or leave processes behind, and two runs never share an output folder."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, make_dataset, run_script

pytestmark = pytest.mark.slow  # every test here trains or starts servers for seconds

RUN = [*FAST, "--size", "24", "--n_epochs", "2", "--n_cpu", "2"]

# Runs train.py as __main__ after patching it the way a test asks: a bug in a loader worker, in the main loop, or a
# domain whose files all fail to decode while the start-up scan is bypassed.
INJECT = r"""
import runpy, sys
sys.path.insert(0, sys.argv[1])
import datasets, report
where = sys.argv[2]
if where == "worker":
    get = datasets.ImageDataset.__getitem__
    def broken(self, key):
        if key[0] == 1:  # in the second epoch, after the first checkpoint
            raise RuntimeError("injected worker failure")
        return get(self, key)
    datasets.ImageDataset.__getitem__ = broken
elif where == "loop":
    log_step, calls = report.Logger.step, []
    def broken(self, losses):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected loop failure")
        return log_step(self, losses)
    report.Logger.step = broken
elif where == "undecodable":
    datasets.not_an_image = lambda path, too_big=None: None
root, sys.argv = sys.argv[1], ["train.py"] + sys.argv[3:]
runpy.run_path(root + "/train.py", run_name="__main__")
"""


def processes_mentioning(text):
    """PIDs of live processes whose command line contains text (loader workers inherit the parent's)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_A=3, n_B=3, size=(28, 28), test=False)


@pytest.mark.parametrize("where", ["worker", "loop", "undecodable"])
def test_a_failure_ends_the_run_at_once_with_no_process_left_and_the_checkpoint_untouched(data, tmp_path, where):
    if where == "undecodable":
        data = make_dataset(tmp_path / "bad", n_A=3, n_B=3, test=False)
        for f in (data / "train" / "B").iterdir():
            f.write_text("not an image")
    out = tmp_path / "run"
    start = time.time()
    r = subprocess.run(
        [sys.executable, "-c", INJECT, str(ROOT), where, "--dataroot", str(data), "--output_dir", str(out), *RUN],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.time() - start < 30 + 15, "took too long"  # + start-up of a loaded 2-core machine
    assert r.returncode != 0
    message = {"worker": "injected worker failure", "loop": "injected loop failure", "undecodable": "failed to decode"}
    assert message[where] in r.stderr, r.stderr
    time.sleep(0.5)
    assert processes_mentioning(str(out)) == []
    if where != "undecodable":  # the first epoch's checkpoint, as written at its end
        assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 3
        assert not list(out.glob("*.tmp"))


def test_a_second_run_on_a_live_output_folder_is_refused_and_a_killed_one_does_not_block(data, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--dataroot",
            str(data),
            "--output_dir",
            str(out),
            *RUN,
            "--n_epochs",
            "50",
            "--decay_epoch",
            "1",
            "--n_cpu",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        while not (out / "checkpoint.pth").exists():
            assert first.poll() is None, first.communicate()[0]
            time.sleep(0.05)
        for extra in ([], ["--resume"]):
            r = run_script("train.py", "--dataroot", data, "--output_dir", out, *FAST, *extra)
            assert r.returncode != 0 and "Traceback" not in r.stderr
            assert f"in use by a running train.py (pid {first.pid}" in r.stderr, r.stderr
    finally:
        first.kill()
        first.wait()
    epochs = int(torch.load(out / "checkpoint.pth", weights_only=True)["epoch"])
    r = run_script(
        "train.py", "--resume", "--output_dir", out, "--n_epochs", epochs, "--decay_epoch", "0"
    )  # nothing to train
    assert r.returncode == 0 and f"all {epochs} epochs of this run are done" in r.stdout, r.stdout + r.stderr


def test_ctrl_c_with_workers_still_saves_and_exits_cleanly(data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--dataroot",
            str(data),
            "--output_dir",
            str(out),
            *RUN,
            "--n_epochs",
            "50",
            "--decay_epoch",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    while not (out / "checkpoint.pth").exists():
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: to the main process and its loader workers
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout
    assert "SIGINT: stopping after this step" in stdout and "--resume" in stdout
    assert processes_mentioning(str(out)) == []
