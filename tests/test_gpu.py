"""CUDA only (skipped elsewhere): the captured step computes what the eager one does, and --deterministic makes a
resumed GPU run bit-identical to the uninterrupted one."""
import contextlib
import functools
import importlib
import os

import pytest
import torch

from conftest import run_script
from models import Discriminator, Generator, use_sliced_padding, weights_init_normal
from test_resume import assert_same_run, data, start_training, wait_for_checkpoint  # noqa: F401 (fixture)
from utils import ReplayBuffer

# Deterministic mode refuses cuBLAS calls without this, and cuBLAS reads it when first used (train.py sets it too).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
train = importlib.import_module("train")
GPU = ["--cuda", "--deterministic"]  # added to test_resume's run of 12 steps


def cuda_setup(capture, amp):
    """train.py's step on the GPU as main() builds it, from nets(0), deterministic kernels."""
    torch.manual_seed(0)
    nets = [Generator(3, 3), Generator(3, 3), Discriminator(3), Discriminator(3)]
    for net in nets:
        net.apply(weights_init_normal)
        use_sliced_padding(net)
        net.to("cuda", memory_format=torch.channels_last)
    G_A2B, G_B2A, D_A, D_B = nets
    lr = torch.tensor(2e-4, device="cuda") if capture else 2e-4
    adam = functools.partial(torch.optim.Adam, lr=lr, betas=(0.5, 0.999), fused=True, capturable=capture)
    buffers = ReplayBuffer(3, 0), ReplayBuffer(3, 1)
    autocast = torch.autocast("cuda", torch.bfloat16, cache_enabled=False) if amp else contextlib.nullcontext()
    step = functools.partial(train.train_step, train.GeneratorLoss(G_A2B, G_B2A, 10.0, 0.5),
                             train.DiscriminatorLoss(D_A, D_B), (D_A, D_B),
                             adam([*G_A2B.parameters(), *G_B2A.parameters()]), adam([*D_A.parameters(), *D_B.parameters()]),
                             torch.amp.GradScaler("cuda", enabled=False), autocast, buffers)
    return nets, buffers, train.CudaGraphStep(step) if capture else step


@pytest.mark.parametrize("amp", [False, True])
def test_the_cuda_graph_step_equals_the_eager_step(amp):
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        runs = []
        for capture in (False, True):
            nets, buffers, step = cuda_setup(capture, amp)
            g = torch.Generator().manual_seed(1)
            losses = []
            for _ in range(8):  # 3 warm-up steps, the capture, 4 replays; the buffers fill and start swapping
                real_A, real_B = ((torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).cuda().contiguous(
                    memory_format=torch.channels_last) for _ in range(2))
                out, _ = step(real_A, real_B, *(b.draw(2).cuda() for b in buffers))
                losses.append(out.clone())
            runs.append((torch.stack(losses), [net.state_dict() for net in nets]))
        (eager_losses, eager_nets), (graph_losses, graph_nets) = runs
        torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-5, atol=1e-6)
        for a, b in zip(graph_nets, eager_nets):
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    finally:
        torch.use_deterministic_algorithms(False)


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
