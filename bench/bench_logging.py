"""Benchmark (not a test): training-thread time per step spent in logging, with and without a live visdom server.

python bench/bench_logging.py        # compare with your step time: 2% of a 50 ms GPU step is 1 ms
"""

import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import ROOT  # noqa: E402
from test_visdom import free_port, start_server  # noqa: E402

sys.path.insert(0, str(ROOT))
from report import Logger, VisdomPlotter  # noqa: E402

URL = "http://127.0.0.1"
from train import LOSS_NAMES  # noqa: E402


def per_step_ms(plotter, steps=2000, display_freq=100, size=256):
    log = Logger(tempfile.mkdtemp(), LOSS_NAMES, 1, 10**6, plotter=plotter)
    log.begin_epoch(0, 1, 0, 10**6)
    images = {k: torch.rand(3, size, size) * 2 - 1 for k in ("real_A", "fake_B", "rec_A", "real_B", "fake_A", "rec_B")}
    with contextlib.redirect_stdout(io.StringIO()):  # the plain progress lines
        t = time.perf_counter()
        for step in range(1, steps + 1):
            log.step(torch.rand(len(LOSS_NAMES)))  # one step's losses, as train_step returns them
            if step % display_freq == 0:
                log.flush(step, step / 1000, 2e-4, images)
        elapsed = time.perf_counter() - t
    log.close()
    return elapsed / steps * 1e3


if __name__ == "__main__":
    port = free_port()
    server = start_server(port, tempfile.mkdtemp())
    try:
        print(f"no visdom:        {per_step_ms(None):.3f} ms per step")
        print(f"live visdom:      {per_step_ms(VisdomPlotter(URL, port, 'bench', LOSS_NAMES)):.3f} ms per step")
    finally:
        server.kill()
    print(
        f"server down:      {per_step_ms(VisdomPlotter(URL, port, 'bench', LOSS_NAMES, verbose=False)):.3f} ms per step"
    )
