"""Live monitoring against a real visdom server (started without its CDN download step) and the real client."""

import base64
import csv
import io
import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image
from visdom import Visdom

from conftest import QUICK, ROOT, make_dataset, run_script
from report import sample_grid

pytestmark = pytest.mark.slow  # every test here trains or starts servers for seconds

LOSS_WINDOWS = ["loss_G", "loss_G_identity", "loss_G_GAN", "loss_G_cycle", "loss_D", "loss_D_A", "loss_D_B", "lr"]
SAMPLE_NAMES = ["real_A", "fake_B", "rec_A", "real_B", "fake_A", "rec_B"]  # the grid's order, row by row


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port, env_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from visdom.server.run_server import main; main()",
            "-port",
            str(port),
            "--hostname",
            "127.0.0.1",
            "-bind_local",
            "-env_path",
            str(env_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            requests.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("visdom server did not start")


@pytest.fixture
def server(tmp_path):
    port = free_port()
    procs = []

    def start():
        procs.append(start_server(port, tmp_path / "visdom_env"))
        return procs[-1]

    yield port, start
    for p in procs:
        p.kill()
        p.wait()


def train_cmd(data, out, port, *extra):
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--dataroot",
        str(data),
        "--output_dir",
        str(out),
        *QUICK,
        "--display_server",
        "http://127.0.0.1",
        "--display_port",
        str(port),
        "--display_env",
        "t",
        *extra,
    ]


def window(port, win, env="t"):
    """A window's state as the server holds it."""
    return json.loads(
        Visdom("http://127.0.0.1", port=port, env=env, use_incoming_socket=False).get_window_data(win, env)
    )


def traces(port, win, env="t"):
    """{trace name: number of points} of a line window, read back from the server."""
    return {t["name"]: len(t["x"]) for t in window(port, win, env)["content"]["data"]}


def csv_rows(out):
    path = out / "losses.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def wait_for_rows(out, n, proc, limit=120):
    t0 = time.time()
    while len(csv_rows(out)) < n:
        assert proc.poll() is None and time.time() - t0 < limit, "training ended before logging"
        time.sleep(0.05)


def test_losses_and_images_are_plotted(tmp_path, server):
    port, start = server
    start()
    data = make_dataset(tmp_path / "d", n_A=3, n_B=2)
    r = subprocess.run(
        train_cmd(data, tmp_path / "o", port, "--n_epochs", "2", "--display_freq", "2", "--n_samples", "2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "cannot reach" not in r.stdout + r.stderr
    rows = csv_rows(tmp_path / "o")
    assert [int(float(row["step"])) for row in rows] == [2, 3, 4, 6]  # every 2 steps and at each epoch end
    for win in LOSS_WINDOWS:
        assert traces(port, win)["interval mean"] == 4
    assert traces(port, "loss_G")["epoch mean"] == 2
    lr_axis = window(port, "lr")["content"]["layout"]["yaxis"]  # a constant lr must not sit at a tick labelled 0
    top = max(float(row["lr"]) for row in rows)
    assert lr_axis["range"][0] == 0 and top < lr_axis["range"][1] < 1.2 * top and lr_axis["tickformat"] == "~g"
    vis = Visdom("http://127.0.0.1", port=port, env="t", use_incoming_socket=False)
    assert not any(vis.win_exists(name, env="t") for name in SAMPLE_NAMES)  # one grid, not six windows
    batch = window(port, "batch")  # the last training batch's crops
    assert batch["type"] == "image" and "step 6 " in batch["title"]
    png = Image.open(io.BytesIO(base64.b64decode(batch["content"]["src"].split(",", 1)[1])))
    blank = {name: np.zeros((3, 32, 32), np.uint8) for name in SAMPLE_NAMES}
    assert png.mode == "RGB" and png.size[::-1] == sample_grid(blank).shape[1:]
    samples = window(port, "samples")  # the fixed test images of the last epoch end, as samples/epoch_002.png
    assert samples["type"] == "image" and "after epoch 2" in samples["title"]
    png = Image.open(io.BytesIO(base64.b64decode(samples["content"]["src"].split(",", 1)[1])))
    assert png.tobytes() == Image.open(tmp_path / "o" / "samples" / "epoch_002.png").tobytes()


def test_the_sample_grid_has_a_row_per_domain_and_labels():
    colours = {name: np.full((3, 24, 24), 40 * i + 20, np.uint8) for i, name in enumerate(SAMPLE_NAMES)}
    colours["fake_B"][0] = 255  # a 3-channel image stays 3-channel
    grid = sample_grid(colours)  # (3, H, W)
    _, H, W = grid.shape
    cell, pad = 144, 4  # 24 px crops are enlarged 6x so that "reconstructed" fits above one
    left, top = W - 3 * cell - 4 * pad, H - 2 * cell - 3 * pad
    for k, name in enumerate(SAMPLE_NAMES):
        i, j = divmod(k, 3)
        y, x = top + pad + i * (cell + pad), left + pad + j * (cell + pad)
        assert (grid[:, y : y + cell, x : x + cell] == colours[name][:, :1, :1]).all(), name
    assert (grid[:, :top, left:] < 128).any() and (grid[:, top:, :left] < 128).any()  # header and row labels drawn
    assert (grid[:, :top, :left] == 255).all()


def test_the_page_opens(server):
    port, start = server
    start()
    Visdom("http://127.0.0.1", port=port, env="myrun", use_incoming_socket=False).text("hi", win="w", env="myrun")
    for url in ("/", "/env/myrun"):
        page = requests.get(f"http://127.0.0.1:{port}{url}", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower() and "visdom" in page.text.lower(), url


def test_a_server_that_comes_up_mid_run_gets_the_whole_history(tmp_path, server):
    port, start = server
    data = make_dataset(tmp_path / "d", n_A=20, n_B=2, size=(28, 28), test=False)
    out = tmp_path / "o"
    proc = subprocess.Popen(
        train_cmd(data, out, port, "--display_freq", "1", "--size", "24", "--n_blocks", "9"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # slow enough to outlast the start
    wait_for_rows(out, 3, proc)
    start()
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert stdout.count("cannot reach") == 1 and "answers now" in stdout
    assert traces(port, "loss_G")["interval mean"] == len(csv_rows(out)) == 20


def test_a_server_killed_mid_run_does_not_stop_training(tmp_path, server):
    port, start = server
    visdom_proc = start()
    data = make_dataset(tmp_path / "d", n_A=12, n_B=2, size=(28, 28), test=False)
    out = tmp_path / "o"
    proc = subprocess.Popen(
        train_cmd(data, out, port, "--display_freq", "1", "--size", "24", "--n_blocks", "9"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_rows(out, 3, proc)
    visdom_proc.send_signal(signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert len(csv_rows(out)) == 12 and stdout.count("cannot reach") == 1


def test_a_server_that_never_answers_costs_nothing(tmp_path):
    """A firewall that drops packets: connections hang. Training must not wait for them beyond a short close."""
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)  # accepts into the backlog, never answers
        data = make_dataset(tmp_path / "d", n_A=4, n_B=2, test=False)
        t0 = time.time()
        r = run_script(
            "train.py", *train_cmd(data, tmp_path / "o", blackhole.getsockname()[1])[2:], "--display_freq", "1"
        )
        assert r.returncode == 0, r.stderr
        assert time.time() - t0 < 60
    assert len(csv_rows(tmp_path / "o")) == 4
