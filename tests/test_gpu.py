"""CUDA only (skipped elsewhere; bench/gpu_check.sh runs this on a GPU machine): what can go wrong on a GPU alone.

The captured step against the eager step (bit for bit, deterministic kernels: only the CudaGraphStep wrapper
differs), a new lr reaching the graph, an epoch that mixes replays with eager steps for its smaller last batch,
test.py --cuda against the CPU, --amp end to end, and a --deterministic resume bit for bit."""

import importlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import QUICK, run_script
from datasets import make_demo
from test_devices import optimizer_tensors
from test_resume import assert_same_run, data, start_training, wait_for_checkpoint  # noqa: F401 (fixture)

# Deterministic mode refuses cuBLAS calls without this, and cuBLAS reads it when first used (train.py sets it too).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
train = importlib.import_module("train")
CUDA = torch.device("cuda")
GPU = ["--cuda", "--deterministic"]


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


def cuda_run(*flags):
    """train.py's run as main() builds it on the GPU (1 residual block, replay buffers of 3), from seed 0."""
    args = train.get_parser().parse_args(
        ["--n_blocks", "1", "--pool_size", "3", "--seed", "0", "--deterministic", "--size", "32", *flags]
    )
    torch.manual_seed(0)
    return args, train.build(args, CUDA)


def make_batches(n, batch=2, size=32):
    g = torch.Generator().manual_seed(1)
    return [{k: torch.rand(batch, 3, size, size, generator=g) * 2 - 1 for k in "AB"} for _ in range(n)]


def state_tensors(run):
    """Every tensor a step changes: weights, Adam's moments and step counts, the replay buffers (not the lrs)."""
    found = [t for net in run.nets.values() for t in net.state_dict().values()]
    found += [t for o in (run.optimizer_G, run.optimizer_D) for name, t in optimizer_tensors(o, "") if name != ".lr"]
    return found + [b.data for b in run.buffers]


@pytest.mark.parametrize("amp", [False, True])
def test_the_captured_step_is_bit_for_bit_the_eager_step(deterministic, amp):
    results = []
    for graph in (False, True):
        args, run = cuda_run(*["--amp"] * amp)
        assert run.dtype == (torch.bfloat16 if amp else None)
        step = train.make_step(run, args)
        step = train.CudaGraphStep(step) if graph else step
        losses = []
        for batch in make_batches(8):  # 3 warm-up steps, the capture, 4 replays; the buffers fill and start swapping
            losses.append(step(*train.to_device(batch, run.buffers, CUDA, run.memory_format))[0].clone())
        if graph:
            assert step.graph is not None and not step.eager, "the capture failed (see the line above)"
        results.append((torch.stack(losses), [t.clone() for t in state_tensors(run)]))
    (eager_losses, eager_state), (graph_losses, graph_state) = results
    assert torch.equal(graph_losses, eager_losses)
    assert len(graph_state) == len(eager_state) and all(torch.equal(a, b) for a, b in zip(graph_state, eager_state))


def test_a_new_lr_reaches_the_captured_graph(deterministic):
    """From one state and one batch, a replay at lr factor 1, 0 and 0.5: no change at 0, half the update at 0.5."""
    args, run = cuda_run()
    factors = {0: 1.0, 1: 0.0, 2: 0.5}
    schedules = []
    for optimizer in (run.optimizer_G, run.optimizer_D):
        optimizer.param_groups[0]["initial_lr"] = args.lr
        schedules.append(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: factors[epoch]))
    step = train.CudaGraphStep(train.make_step(run, args))
    batches = make_batches(6)
    for batch in batches[:5]:  # warm-up, capture, one replay
        step(*train.to_device(batch, run.buffers, CUDA, run.memory_format))
    assert step.graph is not None
    inputs = train.to_device(batches[5], run.buffers, CUDA, run.memory_format)  # the same draws for each replay
    start = [t.clone() for t in state_tensors(run)]
    weights = slice(0, sum(len(net.state_dict()) for net in run.nets.values()))

    def replay_from_start():
        with torch.no_grad():
            for t, s in zip(state_tensors(run), start):
                t.copy_(s)
        step(*inputs)
        return [t.clone() for t in state_tensors(run)[weights]]

    full = replay_from_start()
    for schedule in schedules:
        schedule.step()  # factor 0
    assert all(torch.equal(a, b) for a, b in zip(replay_from_start(), start[weights]))
    for schedule in schedules:
        schedule.step()  # factor 0.5
    half = replay_from_start()
    changed = 0
    for w0, w1, w_half in zip(start[weights], full, half):
        atol = 4 * torch.finfo(torch.float32).eps * w0.abs().max().item()  # a few roundings of w0 + update
        torch.testing.assert_close(w_half - w0, 0.5 * (w1 - w0), rtol=1e-3, atol=atol)
        changed += not torch.equal(w1, w0)
    assert changed > len(full) // 2  # the full-lr replay did update the weights


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    """A small demo data set (python datasets.py demo) of 7 training images per domain: with --batchSize 2 an epoch
    is 3 batches of 2 and a last batch of 1; 4 test scenes per domain."""
    return make_demo(tmp_path_factory.mktemp("demo"), size=40, n_train=7, n_test=4)


MIXED = [*QUICK, "--no_visdom", "--batchSize", "2", "--n_epochs", "3", "--decay_epoch", "1", "--pool_size", "3", *GPU]


@pytest.fixture(scope="module")
def mixed_runs(odd_data, tmp_path_factory):
    """train.py with the graph (warm-up, then replays, each epoch's last batch eager) and with --eager."""
    outs = {}
    for name, extra in (("graph", []), ("eager", ["--eager"])):
        outs[name] = tmp_path_factory.mktemp(name)
        r = run_script("train.py", "--dataroot", odd_data, "--output_dir", outs[name], *MIXED, *extra)
        assert r.returncode == 0, r.stderr
        assert "capture failed" not in r.stderr
        assert ("the step runs eagerly: --eager" in r.stdout) == bool(extra), r.stdout
    return outs


def test_an_epoch_of_replays_and_eager_last_batches_equals_an_all_eager_run(mixed_runs):
    assert_same_run(mixed_runs["graph"], mixed_runs["eager"])  # 12 steps: weights, Adam, buffers, losses.csv


# Grey levels (mean, 99th percentile) of |bf16 - fp32|, twice what the CPU's bfloat16 autocast gave for generators
# trained like these (translations 0.6-0.8 and 3; reconstructions, through both generators, 1.5-2.4 and 7-9).
BF16_TOLERANCE = {"A": (1.6, 6), "B": (1.6, 6), "rec_A": (4.8, 18), "rec_B": (4.8, 18)}


def test_test_script_on_the_gpu_matches_the_cpu_within_bfloat16_rounding_on_the_demo(odd_data, mixed_runs, tmp_path):
    run = mixed_runs["graph"]
    generators = ["--generator_A2B", run / "netG_A2B.pth", "--generator_B2A", run / "netG_B2A.pth"]
    for device in ("cpu", "cuda"):
        r = run_script(
            "test.py",
            "--dataroot",
            odd_data,
            "--output_dir",
            tmp_path / device,
            "--n_cpu",
            "0",
            *generators,
            *["--cuda"] * (device == "cuda"),
        )
        assert r.returncode == 0, r.stderr
    folders = ("A", "B", "rec_A", "rec_B")
    names = {f: sorted(p.name for p in (tmp_path / "cpu" / f).iterdir()) for f in folders}
    assert names == {f: sorted(p.name for p in (tmp_path / "cuda" / f).iterdir()) for f in folders}
    for folder in folders:
        diff = np.concatenate(
            [
                np.abs(
                    np.asarray(Image.open(tmp_path / "cpu" / folder / n), dtype=np.int16)
                    - np.asarray(Image.open(tmp_path / "cuda" / folder / n), dtype=np.int16)
                ).ravel()
                for n in names[folder]
            ]
        )
        # bf16 keeps 8 significant bits: a few grey levels here and there, never a different picture
        mean, p99 = BF16_TOLERANCE[folder]
        assert diff.mean() <= mean and np.percentile(diff, 99) <= p99, (folder, diff.mean(), diff.max())


@pytest.mark.parametrize("extra", [[], ["--attention"]], ids=["paper", "attention"])
def test_amp_training_runs_end_to_end_on_the_gpu(odd_data, tmp_path, extra):
    out = tmp_path / "amp"
    r = run_script(
        "train.py",
        "--dataroot",
        odd_data,
        "--output_dir",
        out,
        *QUICK,
        "--no_visdom",
        "--cuda",
        "--amp",
        "--display_freq",
        "2",
        *extra,
    )
    assert r.returncode == 0, r.stderr
    assert "capture failed" not in r.stderr and "eagerly" not in r.stdout  # bf16 on this GPU: captured, not scaled
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 7 and all((out / f"net{n}.pth").exists() for n in ("G_A2B", "G_B2A", "D_A", "D_B"))
    rows = (out / "losses.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and "nan" not in "".join(rows[1:]).lower()


@pytest.fixture(scope="module")
def gpu_reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_reference")
    proc = start_training(data, out, *GPU)
    assert proc.wait(timeout=600) == 0, proc.communicate()[0]
    return out


def test_deterministic_resume_on_the_gpu_is_bit_identical(data, gpu_reference, tmp_path):
    out = tmp_path / "run"
    proc = start_training(data, out, *GPU)
    wait_for_checkpoint(out, proc)
    proc.kill()
    proc.wait()
    r = run_script("train.py", "--resume", "--output_dir", out, "--cuda")
    assert r.returncode == 0, r.stderr
    assert_same_run(out, gpu_reference)
