"""What train.py leaves at each epoch end, end to end: metrics.csv (--eval_freq, a tiny registered feature extractor
standing in for Inception), the fixed-sample sheets, the figures and training.html, --keep_best; and after a SIGKILL
at a random moment and --resume, the same weights, rows and sheets as the uninterrupted run."""
import csv
import html.parser
import os
import random
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
import torch
from PIL import Image

from conftest import QUICK, ROOT, make_dataset, run_script
from test_resume import assert_same_run

# 2 epochs of 6 steps at 24 px (a checkpoint every 2 steps), FID/KID after each, 2 fixed images per domain, figures.
RUN = [*[f for f in QUICK if f != "--no_figures"], "--no_visdom", "--size", "24", "--n_epochs", "2",
       "--decay_epoch", "1", "--save_freq", "2", "--display_freq", "1", "--eval_freq", "1", "--keep_best",
       "--n_samples", "2"]
# Runs train.py with no network, and the tests' tiny extractor in place of Inception unless told "inception".
# argv: ROOT TESTS EXTRACTOR train-args...
WRAPPER = r"""
import runpy, socket, sys
root, tests, extractor = sys.argv[1:4]
sys.path[:0] = [root, tests]
def refuse(*args, **kwargs):
    raise OSError("network blocked in tests")
socket.getaddrinfo = refuse
import metrics, test_metrics
metrics.EXTRACTOR = test_metrics.TINY if extractor == "tiny" else metrics.INCEPTION
sys.argv = [root + "/train.py"] + sys.argv[4:]
runpy.run_path(root + "/train.py", run_name="__main__")
"""


def train(data, out, *extra, background=False, extractor="tiny"):
    cmd = [sys.executable, "-c", WRAPPER, str(ROOT), str(ROOT / "tests"), extractor, "--dataroot", str(data),
           "--output_dir", str(out), *RUN, *extra]
    env = {**os.environ, "TORCH_HOME": str(out.parent / "torch_home")}  # the real sets' cached features go here
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_A=6, n_B=3, size=(28, 30), modes=("RGB", "L"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = train(data, out)
    assert r.returncode == 0, r.stderr
    return out, r


def metric_rows(out):
    """metrics.csv without the wall-clock column."""
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href")]


def test_every_epoch_leaves_metrics_samples_figures_and_a_page(reference):
    out, r = reference
    rows = metric_rows(out)
    assert [(row["epoch"], row["step"]) for row in rows] == [("1", "6"), ("2", "12")]
    assert all(float(row[k]) >= 0 for row in rows for k in row if k.startswith(("fid", "kid_std")))
    assert "epoch 1: FID A2B" in r.stdout and "epoch 2: FID A2B" in r.stdout
    best = min(rows, key=lambda row: float(row["fid_A2B"]) + float(row["fid_B2A"]))
    assert (out / "best_netG_A2B.pth").is_file() and (out / "best_netG_B2A.pth").is_file()
    if best["epoch"] == "2":  # kept at the best epoch: the last one's generators are then the same
        assert all(torch.equal(a, b) for a, b in zip(torch.load(out / "best_netG_A2B.pth").values(),
                                                      torch.load(out / "netG_A2B.pth").values()))
    for epoch in (1, 2):  # 2 + 2 test images, 4 columns (identity too), cells enlarged to 128 px
        sheet = Image.open(out / "samples" / f"epoch_{epoch:03d}.png")
        assert sheet.mode == "RGB" and sheet.width > 4 * 128 and sheet.height > 4 * 128
    for svg in ("loss_G", "loss_D", "loss_G_cycle", "loss_G_GAN", "loss_G_identity", "loss_D_A", "loss_D_B", "lr"):
        ET.parse(out / "plots" / f"{svg}.svg")
    assert Image.open(out / "plots" / "overview.png").size[0] > 0
    page = Links()
    page.feed((out / "training.html").read_text())
    assert "samples/epoch_002.png" in page.links and "samples/epoch_001.png" in page.links
    assert all((out / link).exists() for link in page.links if "://" not in link and not link.startswith("#")
               and link != "index.html")
    t = run_script("test.py", "--dataroot", reference_data(out), "--output_dir", out, "--n_cpu", "0")
    assert t.returncode == 0, t.stderr
    assert 'href="training.html"' in (out / "index.html").read_text()


def reference_data(out):
    """The data root a run was trained on, from its checkpoint."""
    return torch.load(out / "checkpoint.pth", weights_only=True)["args"]["dataroot"]


def test_sigkill_at_a_random_moment_then_resume_ends_as_the_uninterrupted_run(data, reference, tmp_path):
    """Evaluation, sheets and figures touch no random stream the training uses: a run killed anywhere (also during
    an evaluation) and resumed has the same weights, the same metrics rows once each, the same sheets, and the same
    curves (the SVGs are byte for byte those of the uninterrupted run)."""
    ref, _ = reference
    out = tmp_path / "run"
    proc = train(data, out, "--no_figures", background=True)  # inherited on resume: drawn once at the end, below
    while not (out / "checkpoint.pth").exists():
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    time.sleep(random.uniform(0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = train(data, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_run(out, ref)
    assert metric_rows(out) == metric_rows(ref)
    for name in ["samples/epoch_001.png", "samples/epoch_002.png"]:
        assert Image.open(out / name).tobytes() == Image.open(ref / name).tobytes(), name
    assert run_script("figures.py", out, "--quiet", "--decay_epoch", "1").returncode == 0  # as the run draws them
    for name in ["loss_G", "loss_D_B", "lr", "fid", "kid"]:  # from all rows, once each
        assert (out / "plots" / f"{name}.svg").read_bytes() == (ref / "plots" / f"{name}.svg").read_bytes(), name


def test_no_inception_weights_and_an_unwritable_plots_folder_cost_a_line_each(data, tmp_path):
    """Offline without the weights file, and with a file where plots/ should be, the run trains to its end."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "plots").write_text("a file where the folder should be")
    r = train(data, out, "--n_epochs", "1", "--decay_epoch", "0", extractor="inception")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("warning: no FID/KID") == 1 and "--fid_weights" in r.stderr
    assert r.stderr.count("warning: figures not drawn") == 1 and "Traceback" not in r.stderr
    assert (out / "netG_A2B.pth").is_file() and (out / "samples" / "epoch_001.png").is_file()
