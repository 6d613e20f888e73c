"""Resume does exactly what was typed, and no run can overwrite another: which flags a command line gave (not which
differ from their defaults), one run per folder, the device a run trained on, a smaller data set on resume, writers
that cannot collide, and the epoch-end files a resume finds."""

import fcntl
import hashlib
import importlib
import shutil
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import figures
from conftest import FAST, ROOT, make_dataset, run_script
from epoch_end import EpochEnd
from files import remove_leftovers, write_atomic
from utils import UserError

train = importlib.import_module("train")


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    """A finished one-epoch run at lr 1e-4 (3 A and 2 B images), and its data."""
    tmp = tmp_path_factory.mktemp("rules")
    data = make_dataset(tmp / "data", n_A=3, n_B=2)
    r = run_script("train.py", "--dataroot", data, "--output_dir", tmp / "run1", *FAST, "--lr", "0.0001")
    assert r.returncode == 0, r.stderr
    return tmp / "run1", data


def resume(*argv):
    """load_checkpoint as train.py's main calls it for this command line: (checkpoint, merged args)."""
    argv = [str(a) for a in argv]
    args = train.get_parser().parse_args(argv)
    typed = checkpoints.typed_flags(train.get_parser(), argv)
    checkpoints.choose_output_dir(args, typed)
    return checkpoints.load_checkpoint(args, typed, train.get_parser(), train.CHECKPOINT_TYPES), args


def variant(run, tmp_path, **saved_flags):
    """A copy of run's checkpoint in a folder of its own, its saved flags changed."""
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    ckpt["args"].update(saved_flags)
    (tmp_path / "v").mkdir()
    torch.save(ckpt, tmp_path / "v" / "checkpoint.pth")
    return tmp_path / "v"


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ---- 2. what was typed is what counts ----


def test_flags_typed_at_their_default_are_honoured_and_refused_by_name(run1):
    run, _ = run1
    _, args = resume("--resume", "--output_dir", run, "--n_epochs", "200", "--decay_epoch", "100")
    assert (args.n_epochs, args.decay_epoch) == (200, 100)  # the parser's defaults, typed: not the run's 1 and 0
    _, args = resume("--resume", "--output_dir", run)
    assert (args.n_epochs, args.decay_epoch, args.lr) == (1, 0, 1e-4)  # untyped: the run's
    with pytest.raises(UserError, match=r"other training flags: --lr 0.0001 \(given 0.0002\)"):
        resume("--resume", "--output_dir", run, "--lr", "0.0002")  # the default, typed, against the run's 1e-4


def test_every_switch_turns_both_ways_and_settings_go_back_to_their_defaults(run1, tmp_path):
    on = variant(run1[0], tmp_path, no_visdom=True, no_figures=True, keep_best=True, deterministic=True, eval_freq=2)
    _, args = resume("--resume", "--output_dir", on, "--visdom", "--figures", "--no_keep_best", "--no_deterministic")
    assert not (args.no_visdom or args.no_figures or args.keep_best or args.deterministic)
    _, args = resume("--resume", "--output_dir", on, "--eval_freq", "0", "--save_freq", "1000")
    assert (args.eval_freq, args.save_freq, args.keep_best, args.no_visdom) == (0, 1000, True, True)
    off = variant(run1[0], tmp_path / "..", no_visdom=False)
    _, args = resume("--resume", "--output_dir", off, "--no_visdom", "--keep_best", "--deterministic")
    assert args.no_visdom and args.keep_best and args.deterministic


# ---- 1. one run per folder, both ways ----


@pytest.mark.slow
def test_resume_path_continues_in_its_own_folder_and_never_writes_into_another_run(run1, tmp_path):
    run, data = run1
    mine = tmp_path / "mine"
    shutil.copytree(run, mine)
    (tmp_path / "output").mkdir()  # the default --output_dir, holding another run
    shutil.copy(run / "netG_A2B.pth", tmp_path / "output" / "netG_A2B.pth")
    (tmp_path / "output" / "losses.csv").write_text("someone else's\n")
    other = digest(tmp_path / "output")
    r = run_script(
        "train.py", "--resume", mine / "checkpoint.pth", "--n_epochs", "2", "--decay_epoch", "1", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert digest(tmp_path / "output") == other
    assert torch.load(mine / "checkpoint.pth", weights_only=True)["position"] == [2, 0]

    r = run_script("train.py", "--resume", mine / "checkpoint.pth", "--output_dir", tmp_path / "output")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: --output_dir {tmp_path / 'output'} holds another run")
    assert digest(tmp_path / "output") == other


@pytest.mark.slow
def test_resume_path_into_a_new_folder_branches_the_run_and_leaves_the_source_alone(run1, tmp_path):
    run, data = run1
    source = digest(run)
    r = run_script(
        "train.py", "--resume", run / "checkpoint.pth", "--output_dir", tmp_path / "branch",
        "--n_epochs", "2", "--decay_epoch", "1", "--dataroot", data,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert digest(run) == source
    ckpt = torch.load(tmp_path / "branch" / "checkpoint.pth", weights_only=True)
    assert ckpt["position"] == [2, 0] and ckpt["args"]["lr"] == 1e-4  # the run's flags, a second epoch
    epochs = [line.split(",")[1] for line in (tmp_path / "branch" / "losses.csv").read_text().splitlines()[1:]]
    assert float(epochs[0]) <= 1 < float(epochs[-1])  # its history came along


# ---- 3. the device a run trained on ----


def test_a_gpu_run_resumed_without_a_device_is_refused_where_a_gpu_is_and_trains_on_the_cpu_elsewhere(
    run1, monkeypatch, capsys
):
    assert torch.load(run1[0] / "checkpoint.pth", weights_only=True)["device"] == "cpu"  # recorded
    ckpt, path = {"device": "cuda"}, Path("run/checkpoint.pth")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="was trained on cuda: pass --device cuda to continue there, or --device cpu"):
        checkpoints.check_device(ckpt, Namespace(device=None, cuda=False), path)
    checkpoints.check_device(ckpt, Namespace(device="cpu", cuda=False), path)  # chosen: no word
    checkpoints.check_device(ckpt, Namespace(device=None, cuda=True), path)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checkpoints.check_device(ckpt, Namespace(device=None, cuda=False), path)
    assert "which this machine does not have: continuing on the CPU" in capsys.readouterr().err


# ---- 4. a smaller data set on resume ----


@pytest.mark.slow
def test_a_saved_position_past_a_smaller_data_set_ends_that_epoch_and_trains_the_next(run1, tmp_path):
    run, _ = run1
    mid = variant(run, tmp_path, n_epochs=3, decay_epoch=2)
    ckpt = torch.load(mid / "checkpoint.pth", weights_only=True)
    ckpt["position"] = [1, 2]  # 1 epoch and 2 samples of the 3-image data set done
    torch.save(ckpt, mid / "checkpoint.pth")
    small = make_dataset(tmp_path / "small", n_A=2, n_B=2)
    r = run_script("train.py", "--resume", "--output_dir", mid, "--dataroot", small, "--no_visdom")
    assert r.returncode == 0, r.stderr
    assert "past this --dataroot's 2: epoch 2 ends here" in r.stdout
    done = torch.load(mid / "checkpoint.pth", weights_only=True)
    assert done["position"] == [3, 0] and done["step"] == ckpt["step"] + 2  # epoch 3 trained: 2 steps


# ---- 5. writers that cannot collide ----


def test_two_writers_of_one_path_each_publish_a_whole_file(tmp_path):
    path, errors = tmp_path / "page.html", []
    contents = [bytes([65 + k]) * 2_000_000 for k in range(2)]

    def writer(content):
        try:
            for _ in range(20):
                write_atomic(path, lambda f: f.write(content))
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and path.read_bytes() in contents and list(tmp_path.iterdir()) == [path]


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (dead.pid, 1, None):
        (tmp_path / f".losses.csv.{pid}.0123abcd.tmp").write_text("x")
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".losses.csv.1.0123abcd.tmp", ".losses.csv.None.0123abcd.tmp"]


@pytest.mark.slow
def test_two_redraws_of_one_run_take_turns(tmp_path):
    """figures.py holds a lock on plots/ from reading .drawn.json to writing it after the files it describes."""
    out = tmp_path / "run"
    (out / "plots").mkdir(parents=True)
    (out / "losses.csv").write_text("step,epoch,loss_G,lr,seconds\n10,0.5,1.0,0.0002,1.0\n20,1.0,0.9,0.0002,2.0\n")
    fd = figures.os.open(out / "plots", figures.os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    proc = subprocess.Popen([sys.executable, str(ROOT / "figures.py"), str(out), "--quiet"])
    time.sleep(4)
    waiting = proc.poll() is None and not (out / "plots" / ".drawn.json").exists()
    figures.os.close(fd)
    assert proc.wait(60) == 0 and waiting
    assert (out / "plots" / ".drawn.json").is_file() and (out / "plots" / "loss_G.svg").is_file()


# ---- 6. the epoch-end files a resume finds ----


def epoch_end_here(out, eval_freq=0, keep_best=False):
    """The flags EpochEnd reads, for a run in folder out without test images."""
    return Namespace(
        output_dir=str(out), dataroot=str(out / "no data"), input_nc=3, output_nc=3, n_samples=4, size=32,
        eval_freq=eval_freq, keep_best=keep_best, fid_weights=None, no_figures=True, decay_epoch=0,
    )  # fmt: skip


def test_a_resume_removes_the_sheets_of_the_epochs_it_trains_again(tmp_path):
    (tmp_path / "samples").mkdir()
    for epoch in (1, 2, 3):
        (tmp_path / "samples" / f"epoch_{epoch:03d}.png").write_bytes(b"sheet")
    EpochEnd(epoch_end_here(tmp_path), resumed_epoch=1)
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["epoch_001.png"]


def fake_epoch_end(out, rows, keep_best=True):
    return SimpleNamespace(out=out, tracker=SimpleNamespace(rows=rows), args=SimpleNamespace(keep_best=keep_best))


def test_a_mid_epoch_resume_says_when_the_best_epochs_generators_were_not_kept(run1, tmp_path, capsys):
    """--keep_best switched on at a resume inside epoch 3, when epoch 2 had the lowest FID: its generators are gone
    (the weights moved on), and one line says so; resumed at epoch 2's end, that end runs again and keeps them."""
    _, data = run1
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,seconds,fid_A2B,kid_A2B,kid_std_A2B,fid_B2A,kid_B2A,kid_std_B2A\n"
        "1,3,1.0,90.0,0.04,0.003,90.0,0.05,0.004\n2,6,2.0,50.0,0.03,0.002,50.0,0.04,0.003\n"
    )
    args = epoch_end_here(tmp_path, eval_freq=1, keep_best=True)
    args.dataroot = str(data)
    EpochEnd(args, resumed_epoch=2, reruns_end=False)
    assert "the lowest FID so far is epoch 2's, whose generators were not kept" in capsys.readouterr().err
    EpochEnd(args, resumed_epoch=2, reruns_end=True)
    assert capsys.readouterr().err == ""


def test_moving_aside_best_generators_never_overwrites_an_earlier_moved_file(tmp_path, capsys):
    for name in ("best_netG_A2B.pth", "best_netG_B2A.pth", "best_netG_A2B.epoch002.pth"):
        (tmp_path / name).write_text(name)
    (tmp_path / figures.BEST).write_text('{"epoch": 2}')
    EpochEnd.stale_best(fake_epoch_end(tmp_path, [{"epoch": 1, "fid_A2B": 9.0, "fid_B2A": 9.0}], False), None)
    assert (tmp_path / "best_netG_A2B.epoch002.pth").read_text() == "best_netG_A2B.epoch002.pth"
    assert (tmp_path / "best_netG_A2B.epoch002-2.pth").read_text() == "best_netG_A2B.pth"
    assert "moved aside as best_netG_A2B.epoch002-2.pth, best_netG_B2A.epoch002.pth" in capsys.readouterr().err


def test_closing_waits_for_the_redraws_within_its_timeout_in_all(tmp_path, monkeypatch):
    script = tmp_path / "slow_figures.py"
    script.write_text("import time\ntime.sleep(30)\n")
    monkeypatch.setattr(figures.Background, "SCRIPT", script)
    out = tmp_path / "run"
    out.mkdir()
    (out / "losses.csv").write_text("step,epoch,loss_G,lr,seconds\n")
    background = figures.Background()
    background.submit(out)
    (out / "index.html").write_text("new files, the same curves: the running redraw is waited for, then one more")
    background.submit(out)
    start = time.monotonic()
    background.close(timeout=2)
    assert time.monotonic() - start < 3.5
    background.proc.kill()


def test_figures_help_says_where_the_decay_is_read_from():
    help_text = figures.get_parser().format_help()
    assert "checkpoint.pth" not in help_text and "logged lr" in help_text
