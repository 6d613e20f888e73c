"""Hostile and careless inputs: crafted files, servers, checkpoints, links and flags cost bounded memory, disk and
time, send nothing anywhere the user did not name, never write through a link, and get one line that says what to do.
Everything crafted here is made by the test, small on disk."""

import errno
import html.parser
import importlib
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import downloads
from conftest import FAST, QUICK, ROOT, make_dataset, run_script, write_image
from downloads import download_dataset
from models import Generator
from test_download import NAME, authors_zip, png, server  # noqa: F401 (fixture)

train = importlib.import_module("train")
MiB = 1 << 20


# Runs a script as __main__ and, at exit, writes its peak RSS (VmHWM: unlike ru_maxrss it starts afresh at exec, so
# the size of the forking pytest process does not count) to the file named first.
MEASURED = """import atexit, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        return next(line.split()[1] for line in f if line.startswith("VmHWM:"))
report, sys.argv = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(report, "w").write(peak()))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_measured(tmp_path, script, *args):
    """Run one of the scripts; (returncode, stdout, stderr, peak RSS of its main process in MiB)."""
    report = tmp_path / f"{script}.peak"
    r = subprocess.run(
        [sys.executable, "-c", MEASURED, report, str(ROOT / script), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=300,
    )
    return r.returncode, r.stdout, r.stderr, int(report.read_text()) / 1024


def strip_png(path, size):
    """A 1-bit PNG of `size` pixels, all black: a few KB on disk, however many pixels it declares."""
    Image.new("1", size).save(path, optimize=True)
    return path


# ---- memory: images that declare too many pixels ----


@pytest.mark.slow
def test_extreme_aspect_ratios_in_a_training_folder_are_left_out_with_bounded_memory(tmp_path):
    data = make_dataset(tmp_path / "data", n_A=20, n_B=2, test=False)
    tall = strip_png(data / "train" / "A" / "tall.png", (1, 400000))
    wide = strip_png(data / "train" / "A" / "wide.png", (4000000, 1))
    assert tall.stat().st_size < 4096 and wide.stat().st_size < 8192
    rc, out, err, peak = run_measured(
        tmp_path, "train.py", "--dataroot", data, "--output_dir", tmp_path / "run", *FAST, "--n_cpu", "2"
    )  # loader workers: where a resize would run
    assert rc == 0, err
    assert "Traceback" not in err and "left out 2 files" in err
    assert "tall.png: 1x400000 px: resized to a shorter side of 35 px" in err and "aspect ratio" in err
    assert "wide.png: 4000000x1 px" in err
    assert peak < 1500, f"peak RSS {peak:.0f} MiB"  # resizing the tall one alone took 3.6 GB


@pytest.mark.slow
def test_test_script_skips_images_it_cannot_translate_in_memory_and_writes_the_page(tmp_path):
    nets = tmp_path / "nets"
    nets.mkdir()
    torch.save(Generator(3, 3, 1).state_dict(), nets / "netG_A2B.pth")
    photos = tmp_path / "photos"
    write_image(photos / "ok.png", "RGB", (20, 12))
    strip_png(photos / "huge.png", (10000, 10000))  # over the 89.5-megapixel decode limit
    strip_png(photos / "strip.png", (20000000, 1))  # padded to 8 rows: 160 million pixels, ~160 GB to translate
    out = tmp_path / "out"
    rc, stdout, err, peak = run_measured(
        tmp_path,
        "test.py",
        "--input",
        photos,
        "--generator",
        nets / "netG_A2B.pth",
        "--output_dir",
        out,
        "--n_cpu",
        "0",
    )
    assert rc == 0, err
    assert "Traceback" not in err and peak < 1500, peak
    assert "huge.png: 10000x10000 px: more than the 89.5 million pixels decoded at most" in err
    assert "strip.png: 20000000x1 px: translating it needs about 64.0 GB of memory even in tiles" in err
    assert "--max_size" in err
    assert sorted(p.name for p in (out / "B").iterdir()) == ["ok.png"]
    assert "huge.png" in (out / "index.html").read_text()  # on the page, under Skipped

    rc, stdout, err, peak = run_measured(
        tmp_path,
        "test.py",
        "--input",
        photos,
        "--generator",
        nets / "netG_A2B.pth",
        "--output_dir",
        tmp_path / "scaled",
        "--n_cpu",
        "0",
        "--max_size",
        "64",
    )
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "scaled" / "B").iterdir()) == ["ok.png", "strip.png"]
    assert Image.open(tmp_path / "scaled" / "B" / "strip.png").size == (64, 1)
    assert Image.open(tmp_path / "scaled" / "B" / "ok.png").size == (20, 12)  # small ones keep their size


@pytest.mark.slow
def test_a_generator_file_claiming_1000_blocks_is_refused_before_anything_is_built(tmp_path):
    """1000 residual blocks would be 5.2 GB of weights; the file's tiny tensors are refused from their shapes."""
    state = {}
    n = 6 + 2 * 1000
    for i in range(n):  # 3 channels in and out, as asked for, and 1x1 convolutions of 1 channel between
        state[f"conv{i}.weight"] = torch.zeros(3 if i == n - 1 else 1, 3 if i == 0 else 1, 1, 1)
        state[f"conv{i}.bias"] = torch.zeros(state[f"conv{i}.weight"].shape[0])
    torch.save(state, tmp_path / "claims.pth")
    assert (tmp_path / "claims.pth").stat().st_size < 2 * MiB
    (tmp_path / "load.py").write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        f"from models import load_generator\nload_generator({str(tmp_path / 'claims.pth')!r})"
    )
    t0 = time.monotonic()
    rc, _, err, peak = run_measured(tmp_path, tmp_path / "load.py")
    assert rc != 0 and "is not a ResNet generator (its convolutions are 1x1, not 7x7 then 3x3 then 7x7)" in err
    assert peak < 800 and time.monotonic() - t0 < 20, peak


# ---- downloads: bounded in disk and time, whatever the server does ----


@pytest.fixture
def small_listed_size(monkeypatch):
    """The data set is listed at 100 kB, so it may be at most ~1.1 MB."""
    monkeypatch.setitem(downloads.DATASETS, NAME, 100_000)


def test_an_endless_body_is_cut_off_at_the_listed_size_and_deleted(server, tmp_path, small_listed_size):
    server.mode = "endless"
    with pytest.raises(ValueError, match=r"sent more than the 1\.2 MB expected.*deleted"):
        download_dataset(NAME, tmp_path, server.url, retries=0)
    assert list(tmp_path.iterdir()) == []


def test_a_declared_length_far_beyond_the_listed_size_is_refused_before_writing(server, tmp_path, small_listed_size):
    server.mode = "huge_length"
    with pytest.raises(ValueError, match=r"declares 10000000\.0 MB.*refused before writing anything"):
        download_dataset(NAME, tmp_path, server.url, retries=0)
    assert list(tmp_path.iterdir()) == []


def test_a_trickling_server_counts_as_stalled(server, tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "STALL", (0.5, 1000))  # a byte every 50 ms is 10 bytes in 0.5 s
    server.mode = "trickle"
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="slower than the stall floor 2 times in a row.*keeps .* bytes"):
        download_dataset(NAME, tmp_path, server.url, retries=1)
    assert time.monotonic() - t0 < 8


def test_too_little_free_disk_is_said_before_downloading(server, tmp_path, monkeypatch):
    data, _ = authors_zip()
    server.files[f"/{NAME}.zip"] = data
    monkeypatch.setattr(downloads, "free_bytes", lambda folder: 10 * MiB)
    with pytest.raises(ValueError, match=r"needs 0 MB of disk in .*10 MB are free: free some space"):
        download_dataset(NAME, tmp_path, server.url, retries=0)
    assert list(tmp_path.iterdir()) == []


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(server, tmp_path, monkeypatch):
    monkeypatch.setattr(zipfile.ZipFile, "extractall", lambda *a, **k: pytest.fail("extraction began"))
    info = zipfile.ZipInfo(f"{NAME}/trainA/bomb.png")
    info.compress_type = zipfile.ZIP_DEFLATED
    data, _ = authors_zip(extra=[(info, bytes(64 * MiB))])  # 64 MiB of zeros deflate to ~64 KB
    assert len(data) < 200_000
    server.files[f"/{NAME}.zip"] = data
    with pytest.raises(ValueError, match=r"would unpack to 67 MB from 0\.1 MB, over 4x \(a zip bomb\?\)"):
        download_dataset(NAME, tmp_path, server.url, retries=0)
    assert list(tmp_path.iterdir()) == []


def test_an_archive_without_the_four_domains_is_not_a_data_set(server, tmp_path):
    data, _ = authors_zip()
    with zipfile.ZipFile(tmp_path / "only_trainA.zip", "w") as zf:
        zf.writestr(f"{NAME}/trainA/x.png", png(0))
    server.files[f"/{NAME}.zip"] = (tmp_path / "only_trainA.zip").read_bytes()
    root = tmp_path / "d"
    with pytest.raises(ValueError, match="not a CycleGAN data set: it holds no train/B, test/A, test/B.*deleted it"):
        download_dataset(NAME, root, server.url, retries=0)
    assert list(root.iterdir()) == []
    (root / NAME / "trainA").mkdir(parents=True)  # as an older version left it: reported, not accepted
    with pytest.raises(ValueError, match=r"is incomplete \(no train/B, test/A, test/B\): move it away"):
        download_dataset(NAME, root, server.url, retries=0)


def test_a_full_disk_while_unpacking_keeps_the_archive_and_says_so(server, tmp_path, monkeypatch):
    data, _ = authors_zip()
    server.files[f"/{NAME}.zip"] = data

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zipfile.ZipFile, "extractall", disk_full)
    with pytest.raises(ValueError, match=r"No space left on device.*nothing was unpacked.*is kept: free space"):
        download_dataset(NAME, tmp_path, server.url, retries=0)
    assert [p.name for p in tmp_path.iterdir()] == [f"{NAME}.zip"]


def test_a_member_name_no_file_system_takes_is_refused(server, tmp_path):
    data, _ = authors_zip(extra=[(zipfile.ZipInfo(f"{NAME}/trainA/{'x' * 300}.png"), png(1))])
    server.files[f"/{NAME}.zip"] = data
    with pytest.raises(ValueError, match="longer than a file system allows.*deleted it"):
        download_dataset(NAME, tmp_path, server.url, retries=0)
    assert list(tmp_path.iterdir()) == []


# ---- nothing is written through a link that was planted ----


@pytest.mark.slow
def test_links_planted_in_the_output_folder_are_never_written_through(tmp_path):
    data = make_dataset(tmp_path / "data", n_A=3, n_B=2)
    out, victims = tmp_path / "run", []
    out.mkdir()
    # the lock, and leftovers of killed writers (pid 1 stays alive: kept, never written through)
    for name in (".lock", ".checkpoint.pth.1.0123abcd.tmp", ".losses.csv.1.0123abcd.tmp", ".netG_A2B.pth.99.f.tmp"):
        victim = tmp_path / f"victim{len(victims)}"
        victim.write_text("keep")
        (out / name).symlink_to(victim)
        victims.append(victim)
    r = run_script("train.py", "--dataroot", data, "--output_dir", out, *FAST)
    assert r.returncode == 0, r.stderr
    assert [v.read_text() for v in victims] == ["keep"] * len(victims)
    assert not (out / ".lock").is_symlink() and (out / "checkpoint.pth").is_file()

    victim = tmp_path / "victim_png"
    victim.write_text("keep")
    (out / "B").mkdir()
    (out / "B" / "img 0 RGB.png").symlink_to(victim)
    r = run_script("test.py", "--dataroot", data, "--output_dir", out, "--n_cpu", "0")
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "keep" and Image.open(out / "B" / "img 0 RGB.png").size == (40, 36)


def test_a_planted_part_file_link_is_refused(server, tmp_path):
    data, _ = authors_zip()
    server.files[f"/{NAME}.zip"] = data
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / f"{NAME}.zip.part").symlink_to(victim)
    with pytest.raises(ValueError, match="is a symbolic link, and a download never writes through one"):
        download_dataset(NAME, tmp_path, server.url, retries=0)
    assert victim.read_bytes() == b"keep"


# ---- a checkpoint never decides where data goes ----


@pytest.mark.slow
def test_a_resumed_checkpoint_naming_another_visdom_server_sends_it_nothing(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def count():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connections.append(listener.accept()[0])
            except OSError:
                pass

    stop = threading.Event()
    thread = threading.Thread(target=count, daemon=True)
    thread.start()
    try:
        data, out = make_dataset(tmp_path / "data", n_A=3, n_B=2, test=False), tmp_path / "run"
        r = run_script("train.py", "--dataroot", data, "--output_dir", out, *FAST)
        assert r.returncode == 0, r.stderr
        ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
        ckpt["args"].update(
            display_server="http://127.0.0.1",
            display_port=listener.getsockname()[1],
            display_env="theirs",
            no_visdom=False,
        )  # as someone else's file would say
        torch.save(ckpt, out / "checkpoint.pth")
        with socket.socket() as s:  # this command line's server: a port where nobody listens
            s.bind(("127.0.0.1", 0))
            ours = s.getsockname()[1]
        r = run_script(
            "train.py",
            "--resume",
            "--output_dir",
            out,
            "--n_epochs",
            "2",
            "--decay_epoch",
            "1",
            "--display_server",
            "http://127.0.0.1",
            "--display_port",
            ours,
        )
        assert r.returncode == 0, r.stderr
        assert f"cannot reach http://127.0.0.1:{ours}" in r.stdout + r.stderr
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert connections == []


# ---- test.py: one name never aborts a folder ----


def test_odd_names_are_each_translated_to_a_distinct_printable_output(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    names = [b"..png", b"caf\xe9.png", b"x" * 251 + b".png", b"x.jpg", b"x.png", b"x.jpg.png", b"X.PNG"]
    for k, name in enumerate(names):
        image = Image.fromarray(np.random.default_rng(k).integers(0, 256, (12, 16, 3), dtype=np.uint8))
        with open(os.path.join(os.fsencode(photos), name), "wb") as f:
            image.save(f, format="JPEG" if name.endswith(b".jpg") else "PNG")
    torch.save(Generator(3, 3, 1).state_dict(), tmp_path / "G.pth")
    out = tmp_path / "out"
    r = run_script("test.py", "--input", photos, "--generator", tmp_path / "G.pth", "--output_dir", out, "--n_cpu", "0")
    assert r.returncode == 0, r.stderr
    assert "wrote 7 A->B translations" in r.stdout
    written = sorted(os.listdir(out / "B"))
    assert len(written) == len(set(n.casefold() for n in written)) == 7
    assert all(len(n.encode()) <= 255 and n.endswith(".png") and n not in ("..png", ".png") for n in written)
    assert "caf\ufffd.png" in written

    class Sources(html.parser.HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                found.append(dict(attrs)["src"])

    found = []
    Sources().feed((out / "index.html").read_text(encoding="utf-8"))
    from urllib.parse import unquote

    assert len(found) == 14 and all((out / unquote(src)).is_file() for src in found)


# ---- one line for every mistake ----


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--lr", "-0.001"], "--lr -0.001: must be a finite number above 0"),
        (["--lr", "nan"], "--lr nan"),
        (["--lr", "inf"], "--lr inf"),
        (["--seed", "-1"], "--seed -1: must be a whole number from 0"),
        (["--seed", str(2**70)], "--seed 1180591"),
        (["--epoch", "-5"], "--epoch -5"),
        (["--epoch", "5", "--n_epochs", "1", "--decay_epoch", "0"], "--epoch 5"),
        (["--input_nc", "0"], "--input_nc 0: images are read as gray (1) or RGB (3)"),
        (["--size", "100000"], "--size 100000"),
        (["--lambda_cycle", "-1"], "--lambda_cycle -1.0"),
        (["--lambda_sparsity", "nan"], "--lambda_sparsity nan: must be a finite number"),
        (["--display_port", "0"], "--display_port 0"),
        (["--n_blocks", "100000"], "--n_blocks 100000: at most 64"),
        (["--eval_freq", "1", "--fid_weights", "no/such.pth"], "--fid_weights no/such.pth is not a file"),
        (["--mask_dir", "."], "--mask_dir measures the attention maps of an --attention run"),
        (["--attention", "--mask_dir", "no/such"], "--mask_dir no/such is not a folder"),
    ],
)
def test_flags_that_cannot_work_are_named(flags, words):
    with pytest.raises(train.UserError, match="^" + words.replace("(", r"\(").replace(")", r"\)")):
        train.check_args(train.get_parser().parse_args(flags))


def checkpoint_cases(tmp_path):
    cases = {"empty": b"", "text": b"not a checkpoint"}
    for name, data in cases.items():
        (tmp_path / f"{name}.pth").write_bytes(data)
    torch.save({"args": {}}, tmp_path / "no_keys.pth")
    good = {k: {} for k in train.CHECKPOINT_TYPES} | {"step": 3, "seconds": 1.0, "scaler": None}
    torch.save(good | {"step": "3"}, tmp_path / "step_str.pth")
    torch.save(good | {"args": {"lr": "fast"}}, tmp_path / "lr_str.pth")
    torch.save(good | {"args": {"n_blocks": 1, "size": 32}}, tmp_path / "nets_empty.pth")
    return {
        "empty": "the file is empty",
        "text": "is not a PyTorch weights file",
        "no_keys": "is not a checkpoint of train.py: it has no 'G_A2B'",
        "step_str": "its 'step' is a str",
        "lr_str": "its flag lr is 'fast', not a float",
        "nets_empty": "does not fit these networks",
    }


@pytest.mark.slow
def test_damaged_or_foreign_checkpoints_are_one_line(tmp_path):
    """Each named as load_checkpoint reads it; the first and the last (found only when the networks are loaded) also
    by the script, as one line."""
    data = make_dataset(tmp_path / "data", n_A=2, n_B=2, test=False)
    cases = checkpoint_cases(tmp_path)
    for name, words in cases.items():
        if name in ("empty", "nets_empty"):
            continue
        args = train.get_parser().parse_args(["--resume", str(tmp_path / f"{name}.pth")])
        with pytest.raises(train.UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            checkpoints.load_checkpoint(args, set(), train.get_parser(), train.CHECKPOINT_TYPES)
    for name in ("empty", "nets_empty"):
        words = cases[name]
        r = run_script(
            "train.py",
            "--resume",
            tmp_path / f"{name}.pth",
            "--dataroot",
            data,
            "--output_dir",
            tmp_path / name,
            "--no_visdom",
            "--n_cpu",
            "0",
        )
        assert r.returncode != 0 and words in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), (name, r.stderr)


@pytest.mark.slow  # a process per case: seconds each
@pytest.mark.parametrize(
    "script, args, words",
    [
        ("train.py", ["--output_dir", "/proc/x", *QUICK], "cannot write to --output_dir /proc/x"),
        ("train.py", ["--dataroot", ROOT / "README.md", *QUICK], "README.md is a file, not a folder"),
        ("train.py", ["--epoch", "5", "--n_epochs", "1", "--decay_epoch", "0"], "--epoch 5: a new run starts"),
        (
            "test.py",
            ["--output_dir", "/proc/x", "--input", "G", "--generator", "G"],
            "cannot write to --output_dir /proc/x",
        ),
        ("test.py", ["--batchSize", "0"], "--batchSize 0: must be at least 1"),
    ],
)
def test_user_mistakes_get_one_line_from_the_scripts(tmp_path, script, args, words):
    torch.save(Generator(3, 3, 1).state_dict(), tmp_path / "G")
    r = run_script(script, *args, cwd=tmp_path)
    assert r.returncode != 0 and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
