"""What train.py leaves at each epoch end, end to end: metrics.csv (--eval_freq, a tiny registered feature extractor
standing in for Inception), the fixed-sample sheets, the figures and training.html, --keep_best; after a SIGKILL
before any step of an epoch end and --resume, the files of the uninterrupted run; what fails costs one line."""

import csv
import hashlib
import html.parser
import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import QUICK, ROOT, make_dataset, run_script
from test_resume import assert_same_run

pytestmark = pytest.mark.slow  # every test here trains or starts servers for seconds

# 2 epochs of 6 steps at 24 px (a checkpoint every 2 steps), FID/KID after each, 2 fixed images per domain, figures.
RUN = [
    *[f for f in QUICK if f != "--no_figures"],
    "--no_visdom",
    "--size",
    "24",
    "--n_epochs",
    "2",
    "--decay_epoch",
    "1",
    "--save_freq",
    "2",
    "--display_freq",
    "1",
    "--eval_freq",
    "1",
    "--keep_best",
    "--n_samples",
    "2",
]
# Runs train.py with no network, and the tests' tiny extractor in place of Inception unless told "inception".
# KILL_BEFORE=STEP: the process SIGKILLs itself when the last epoch's end (KILL_EPOCH's, if set) is about to take
# that step of EpochEnd.STEPS ("close": after the last step). argv: ROOT TESTS EXTRACTOR train-args...
WRAPPER = r"""
import os, runpy, signal, socket, sys
root, tests, extractor = sys.argv[1:4]
sys.path[:0] = [root, tests]
def refuse(*args, **kwargs):
    raise OSError("network blocked in tests")
socket.getaddrinfo = refuse
import epoch_end, metrics, test_metrics
metrics.EXTRACTOR = test_metrics.TINY if extractor == "tiny" else metrics.INCEPTION
step = os.environ.get("KILL_BEFORE")
if step:
    original = getattr(epoch_end.EpochEnd, step)
    def killing(self, *run):
        if step == "close" or run[0].epoch == int(os.environ.get("KILL_EPOCH", self.args.n_epochs)):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *run)
    setattr(epoch_end.EpochEnd, step, killing)
if os.environ.get("EVENTS"):  # the redraws asked for and the checkpoints written, in order, a line each
    import checkpoints, figures
    def logged(original, line):
        def call(*args, **kwargs):
            with open(os.environ["EVENTS"], "a") as f:
                f.write(line(args) + "\n")
            return original(*args, **kwargs)
        return call
    figures.Background.submit = logged(figures.Background.submit, lambda args: "redraw")
    # train.py's, not yet imported
    checkpoints.try_save = logged(checkpoints.try_save, lambda args: "save " + args[1].name)
sys.argv = [root + "/train.py"] + sys.argv[4:]
runpy.run_path(root + "/train.py", run_name="__main__")
"""


def train(data, out, *extra, background=False, extractor="tiny", kill_before=None, env=None):
    cmd = [
        sys.executable,
        "-c",
        WRAPPER,
        str(ROOT),
        str(ROOT / "tests"),
        extractor,
        "--dataroot",
        str(data),
        "--output_dir",
        str(out),
        *RUN,
        *extra,
    ]
    env = {**os.environ, "TORCH_HOME": str(out.parent / "torch_home"), **(env or {})}  # the cached features go here
    if kill_before:
        env["KILL_BEFORE"] = kill_before
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
    r = train(data, out, env={"EVENTS": str(out.parent / "events.txt")})
    assert r.returncode == 0, r.stderr
    return out, r


def metric_rows(out):
    """metrics.csv without the wall-clock column and the weights' name."""
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in ("seconds", "weights")} for row in csv.DictReader(f)]


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
        assert all(
            torch.equal(a, b)
            for a, b in zip(torch.load(out / "best_netG_A2B.pth").values(), torch.load(out / "netG_A2B.pth").values())
        )
    for epoch in (1, 2):  # 2 + 2 test images, 4 columns (identity too), cells enlarged to 128 px
        sheet = Image.open(out / "samples" / f"epoch_{epoch:03d}.png")
        assert sheet.mode == "RGB" and sheet.width > 4 * 128 and sheet.height > 4 * 128
    for svg in (
        "loss_G",
        "loss_D",
        "loss_G_cycle",
        "loss_G_GAN",
        "loss_G_identity",
        "loss_D_A",
        "loss_D_B",
        "lr",
        "fid",
        "kid",
    ):
        ET.parse(out / "plots" / f"{svg}.svg")
    assert Image.open(out / "plots" / "overview.png").size[0] > 0
    page = Links()
    page.feed((out / "training.html").read_text())
    assert "samples/epoch_002.png" in page.links and "samples/epoch_001.png" in page.links
    assert all(
        (out / link).exists()
        for link in page.links
        if "://" not in link and not link.startswith("#") and link != "index.html"
    )
    t = run_script("test.py", "--dataroot", reference_data(out), "--output_dir", out, "--n_cpu", "0")
    assert t.returncode == 0, t.stderr
    assert 'href="training.html"' in (out / "index.html").read_text()


def reference_data(out):
    """The data root a run was trained on, from its checkpoint."""
    return torch.load(out / "checkpoint.pth", weights_only=True)["args"]["dataroot"]


def test_the_runs_last_redraw_is_asked_for_before_its_last_checkpoint_is_written(reference):
    """It then draws on the core that the checkpoint's write leaves idle, not after the sheet; closing waits for it
    (tests/test_figures.py) and redraws the page, which shows the sheet."""
    out, _ = reference
    events = (out.parent / "events.txt").read_text().splitlines()
    last = len(events) - 1 - events[::-1].index("save checkpoint.pth")
    assert events[last - 1] == "redraw", events
    assert "redraw" in events[last + 1 :] and 'src="samples/epoch_002.png"' in (out / "training.html").read_text()


def test_a_kill_before_any_step_of_an_epoch_end_is_finished_by_the_resume(data, reference, tmp_path):
    """SIGKILL before the sheet, evaluation and best steps of the last epoch's end and after the last step, in turn
    (each resume finishes the steps before it, then is killed), after one kill inside the first epoch's end; the last
    resume, which finds every epoch done, ends with the files of the uninterrupted run: generators, sheets, metrics
    rows once each, best files of the best row, the same curves. All of it offline, with --fid_weights, which the
    printed resume command carries."""
    ref, _ = reference
    out, weights = tmp_path / "run", tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, weights)  # the tiny extractor ignores it; the run checks and names it
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    first = train(data, out, "--fid_weights", weights, kill_before="sheet", env={"KILL_EPOCH": "1"})
    assert first.returncode == -signal.SIGKILL
    assert not (out / "samples" / "epoch_001.png").exists() and (out / "netG_A2B.pth").is_file()
    for step in ["sheet", "evaluation", "best", "close"]:  # generators and figures: rewritten whole, like the rest
        r = train(data, out, "--resume", "--fid_weights", weights, kill_before=step)
        assert r.returncode == -signal.SIGKILL, (step, r.stderr)
    r = train(data, out, "--resume", "--fid_weights", weights)
    assert r.returncode == 0 and "all 2 epochs of this run are done" in r.stdout, r.stderr
    assert_same_run(out, ref)
    for name in ("G_A2B", "G_B2A", "D_A", "D_B"):
        assert_same_weights(out / f"net{name}.pth", ref / f"net{name}.pth")
    assert metric_rows(out) == metric_rows(ref)
    with open(out / "metrics.csv", newline="") as f:
        assert [row["weights"] for row in csv.DictReader(f)] == [sha[:16]] * 2
    best = min(metric_rows(out), key=lambda row: float(row["fid_A2B"]) + float(row["fid_B2A"]))
    assert json.loads((out / "best_netG.json").read_text())["epoch"] == int(best["epoch"])
    for name in ("G_A2B", "G_B2A"):
        assert_same_weights(out / f"best_net{name}.pth", ref / f"best_net{name}.pth")
    for name in ["samples/epoch_001.png", "samples/epoch_002.png"]:
        assert Image.open(out / name).tobytes() == Image.open(ref / name).tobytes(), name
    for name in ["loss_G", "loss_D_B", "lr", "fid", "kid"]:  # from all rows, once each
        assert (out / "plots" / f"{name}.svg").read_bytes() == (ref / "plots" / f"{name}.svg").read_bytes(), name
    t = run_script("test.py", "--dataroot", data, "--output_dir", out, "--n_cpu", "0")
    assert t.returncode == 0, t.stderr
    assert 'href="training.html"' in (out / "index.html").read_text()  # and back, though training came first:
    assert 'href="index.html"' in (out / "training.html").read_text()
    stop = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import checkpoints, types; "
            "args = checkpoints.load_weights(sys.argv[2])['args']; "
            "print(checkpoints.resume_command(types.SimpleNamespace(**args)))",
            str(ROOT),
            str(out / "checkpoint.pth"),
        ],
        capture_output=True,
        text=True,
    )
    assert f"--fid_weights {weights}" in stop.stdout, stop.stderr  # what a stopped run prints


def assert_same_weights(a, b):
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), a.name


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


def test_without_matplotlib_and_with_an_unwritable_feature_cache_the_run_finishes_with_a_page(data, tmp_path):
    """No matplotlib (a stand-in that fails to import, for the redraws too) and a file where the feature cache's
    folder goes: one line each, the run trains to its end, and training.html is written without curves."""
    out, fake = tmp_path / "run", tmp_path / "no_matplotlib"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib in this test')\n")
    (tmp_path / "torch_home").mkdir()
    (tmp_path / "torch_home" / "fidelity_cache").write_text("a file where the cache folder should be")
    r = train(data, out, "--n_epochs", "1", "--decay_epoch", "0", env={"PYTHONPATH": str(fake)})
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("warning: no FID/KID") == 1 and "fidelity_cache" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("warning: figures not drawn") == 1 and "no matplotlib in this test" in r.stderr
    page = (out / "training.html").read_text()
    assert "samples/epoch_001.png" in page and "plots/" not in page and (out / "netG_A2B.pth").is_file()


class Stub:
    """What EpochEnd.best and stale_best read of a run and its tracker."""

    def __init__(self, out, rows, keep_best=True):
        self.out, self.args = out, SimpleNamespace(keep_best=keep_best, output_dir=str(out))
        self.tracker = SimpleNamespace(
            rows=[{"epoch": float(e), "step": 6.0 * e, "fid_A2B": a, "fid_B2A": b} for e, a, b in rows]
        )


def test_the_best_files_follow_the_best_row_whatever_came_before(tmp_path, capsys):
    from epoch_end import EpochEnd
    from figures import kept_epoch

    nets = {"G_A2B": torch.nn.Linear(2, 2), "G_B2A": torch.nn.Linear(2, 2)}
    end = Stub(tmp_path, [(1, 30.0, 30.0), (2, 20.0, 25.0)])
    EpochEnd.best(end, SimpleNamespace(epoch=2, nets=nets))  # the row is there, the files are not (a kill between)
    assert kept_epoch(tmp_path) == 2
    weight = torch.load(tmp_path / "best_netG_A2B.pth")["weight"]
    nets["G_A2B"].weight.data += 1
    (tmp_path / "best_netG_B2A.pth").unlink()  # a kill between the two files: the pair is written again
    EpochEnd.best(end, SimpleNamespace(epoch=2, nets=nets))
    assert kept_epoch(tmp_path) == 2 and not torch.equal(torch.load(tmp_path / "best_netG_A2B.pth")["weight"], weight)
    EpochEnd.best(
        Stub(tmp_path, [(1, 30.0, 30.0), (2, 20.0, 25.0), (3, 40.0, 40.0)]), SimpleNamespace(epoch=3, nets=nets)
    )  # not the best: left alone
    assert kept_epoch(tmp_path) == 2
    resumed = Stub(tmp_path, [(1, 30.0, 30.0)])  # an older checkpoint: the rows of epochs 2 and 3 are gone
    EpochEnd.stale_best(resumed, 1)
    assert kept_epoch(tmp_path) is None and (tmp_path / "best_netG_A2B.epoch002.pth").is_file()
    assert "moved aside" in capsys.readouterr().err
    EpochEnd.stale_best(Stub(tmp_path, [(1, 30.0, 30.0), (2, 10.0, 10.0)]), 3)  # --keep_best turned on late
    assert "whose generators were not kept" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_the_sheet_is_a_bfloat16_preview_where_bfloat16_is_native(tmp_path, monkeypatch, native):
    """At 8 steps an epoch the sheet's 24 generator passes cost a step: where bfloat16 is native (amp_dtype) it is
    drawn in bfloat16, at half the time, whatever the run trains in; elsewhere in the run's own precision."""
    import numpy as np

    import epoch_end

    seen = []
    monkeypatch.setattr(epoch_end, "amp_dtype", lambda device: torch.bfloat16 if native else None)
    monkeypatch.setattr(epoch_end, "sample_sheet", lambda *a: seen.append(a[-1]) or np.zeros((3, 8, 8), np.uint8))
    end = SimpleNamespace(out=tmp_path, samples={"A": [torch.zeros(3, 8, 8)], "B": []}, sheet_shown=None)
    run = SimpleNamespace(
        epoch=1,
        nets={"G_A2B": None, "G_B2A": None},
        device=torch.device("cpu"),
        memory_format=torch.contiguous_format,
        autocast=torch.autocast("cpu", enabled=False),
    )
    epoch_end.EpochEnd.sheet(end, run)
    assert (tmp_path / "samples" / "epoch_001.png").is_file()
    if native:
        assert isinstance(seen[0], torch.autocast) and seen[0].fast_dtype == torch.bfloat16 and seen[0]._enabled
    else:
        assert seen == [run.autocast]
