"""Where and how a run computes: processes and DDP, device, precision and memory layout, random states, the
fused Adam, the CUDA-graph step, and stopping on Ctrl-C or SIGTERM."""
import contextlib
import gc
import multiprocessing
import os
import random
import signal
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist


def setup_processes(args):
    """This process's place in the run (rank, device, torchrun's process groups), determinism, and one seed for all."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first call
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every empty(): no row is read unwritten
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not args.deterministic, args.deterministic
    device, control = torch.device("cuda" if args.cuda else "cpu"), None
    if world_size > 1:
        if args.cuda:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if args.cuda else "gloo")
        control = dist.new_group(backend="gloo")  # stop requests and checkpoint gathering, on the CPU
    if args.seed is None:
        seed = [int.from_bytes(os.urandom(4), "little")]
        if control:
            dist.broadcast_object_list(seed, src=0, group=control)
        args.seed = seed[0]
    seed_everything(args.seed)
    return SimpleNamespace(rank=rank, size=world_size, ddp=world_size > 1, is_main=rank == 0, device=device,
                           control=control)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(cuda=False):
    """Every global random generator's state (cuda: this process's GPU's too), as types torch.load(weights_only=True)
    accepts."""
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if cuda else None}


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if torch.cuda.is_available() and torch.is_tensor(cuda):
        torch.cuda.set_rng_state(cuda)


def amp_dtype(device):
    """The autocast type of mixed precision (--amp): bfloat16 where the device computes it natively, float16 (with loss scaling) on
    GPUs without bfloat16, None on CPUs without bfloat16 units (there it is many times slower than float32)."""
    if device.type == "cuda":  # by default is_bf16_supported also counts bfloat16 emulated on pre-Ampere GPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    # Not mkldnn's bf16 check: oneDNN emulates bfloat16 on any AVX-512 CPU, where it runs at a third of fp32's speed.
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else None


def precision(device):
    """(memory layout, autocast) of the translation: off the CPU channels_last (cuDNN's fast layout, for G and its
    inputs alike) and on the GPU bf16 (fp16 without it); on the CPU contiguous fp32, so results are exact."""
    layout = torch.channels_last if device.type != "cpu" else torch.contiguous_format
    return layout, torch.autocast("cuda", amp_dtype(device)) if device.type == "cuda" else contextlib.nullcontext()


# Peak memory of a 9-block generator's forward per (padded) input pixel: 0.9-1 KB measured in float32 on the CPU
# at 512-1024 px; used to skip, before decoding, an image that could not be translated in the memory that is free.
BYTES_PER_PIXEL = 1000


def free_memory(device):
    """Bytes free for translating: the GPU's free memory, or the CPU's available memory (Linux: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 8 << 30  # not Linux: assume 8 GB


def free_pixels(device):
    """Padded pixels a translation may hold: 80% of the free memory, at BYTES_PER_PIXEL each."""
    return int(0.8 * free_memory(device) / BYTES_PER_PIXEL)


def adam(params, lr, device, lr_tensor):
    """The paper's Adam, fused into one kernel. lr_tensor: the lr is a tensor on the device that the schedule fills in
    place, so a captured CUDA graph reads every new value (and needs the step counts on the device: capturable)."""
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999), fused=True, capturable=lr_tensor)
    if lr_tensor:  # set after construction: Adam's check of lr >= 0 would read a device tensor back
        optimizer.param_groups[0]["lr"] = torch.tensor(lr, device=device)
    return optimizer


def to_device(batch, buffers, device, memory_format):
    """A loader batch for the step: real_A, real_B on the device in the networks' layout, and both replay buffers'
    draws for it (pinned on CUDA, so that their non-blocking copies do not wait for the host)."""
    real_A, real_B = (batch[k].to(device, memory_format=memory_format, non_blocking=True) for k in "AB")
    draws = [buffer.draw(len(real_A)) for buffer in buffers]
    if device.type == "cuda":
        draws = [d.pin_memory() for d in draws]
    return real_A, real_B, *(d.to(device, non_blocking=True) for d in draws)


class CudaGraphStep:
    """`step` replayed as one CUDA graph on static input buffers: no Python or kernel-launch overhead per step.

    The first `warmup` calls run eagerly on a side stream (cuDNN picks its kernels; optimizers and replay buffers
    allocate their state), the next one captures the graph and replays it. Every call is a real training step. If the
    capture fails, one line names the error and every step runs eagerly: capturing executes nothing, so the state
    the eager step continues from is the state the capture started from."""

    def __init__(self, step, warmup=3):
        self.step, self.warmup, self.graph, self.eager = step, warmup, None, False

    def __call__(self, *inputs):
        if self.eager:
            return self.step(*inputs)
        if self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.graph = self.capture(inputs)
            if self.graph is None:
                self.eager = True
                return self.step(*inputs)
        for static, x in zip(self.inputs, inputs):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def capture(self, inputs):
        """The captured graph, reading self.inputs and writing self.outputs; None (and one line why) if it failed."""
        stream = torch.cuda.current_stream()
        self.inputs = [x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loader's pin-memory thread may allocate while we capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.step(*self.inputs)
            return graph
        except Exception as e:
            torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture's side stream current
            cause = e
            while cause.__context__ is not None:  # the error inside the step, not the capture's own complaint about it
                cause = cause.__context__
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            print(f"CUDA graph capture failed ({type(cause).__name__}: {first}); the step runs eagerly from here on "
                  f"(as with --eager)", file=sys.stderr)
            self.inputs = self.outputs = None
            return None


class Stopper:
    """Where a run stops early. SIGINT or SIGTERM: finish the step, save, exit; a second Ctrl-C: quit at once without
    saving. Under torchrun (group: a gloo process group) every rank stops after the same step, and a rank whose
    launcher is gone stops too: torchrun's workers run in their own sessions and would outlive it."""

    def __init__(self, group=None, rank=0):
        self.reason, self.group, self.rank, self.launcher = None, group, rank, os.getppid()
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)

    def request(self, signum, frame):
        name = signal.Signals(signum).name
        if self.reason == name == "SIGINT":  # not SIGTERM: torchrun sends one on Ctrl-C after the SIGINT
            print("quitting without saving", file=sys.stderr)
            raise SystemExit(130)
        if self.reason is None:
            self.reason = name
            print(f"\n{name}: stopping after this step (Ctrl-C again to quit without saving)", file=sys.stderr)

    def __call__(self):
        """Whether to stop after this step: asked here or, under DDP, on any rank."""
        if self.group is None:
            return self.reason is not None
        if self.reason is None and os.getppid() != self.launcher:
            self.reason = "launcher gone"
            print(f"rank {self.rank}: torchrun (pid {self.launcher}) is gone: stopping after this step", file=sys.stderr)
        flag = torch.tensor([int(self.reason is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def ignore_signals(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def before_exit():
    """Kill the loader's worker processes: they ignore SIGTERM (see ignore_signals), so the exit handler of
    multiprocessing, which terminates and then joins them, would wait forever after an error. And leave the objects
    of torch's modules to the OS: the interpreter's last collections over them take most of a second on a small CPU."""
    gc.freeze()
    if hasattr(signal, "SIGCHLD"):  # the loader's SIGCHLD handler would raise at the first death
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(5)


def loader_workers(n_cpu, n_items):
    """DataLoader workers worth starting: at most n_cpu, the CPUs this process may run on, and n_items
    (more only cost start-up time, and make PyTorch warn about excessive worker creation)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(n_cpu, cpus, n_items))
