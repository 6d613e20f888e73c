"""Where and how a run computes: processes and DDP, device, precision and memory layout, random states, the
fused Adam, free memory and the loader's workers."""

import contextlib
import os
import random
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from utils import UserError

DEVICES = "cpu, cuda, cuda:N or mps"


def chosen_device(args):
    """The torch.device of --device, or of the seed's --cuda (cuda), if this machine has it; UserError otherwise."""
    name = args.device or ("cuda" if args.cuda else "cpu")
    flag = "--cuda" if args.cuda and not args.device else f"--device {name}"
    if args.cuda and not name.startswith("cuda"):
        raise UserError(f"--cuda and --device {name} disagree: give one of them")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; use {DEVICES}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: this program runs on {DEVICES}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and gpus == 0:
        raise UserError(f"{flag} was given but PyTorch sees no CUDA GPU; drop {flag.split()[0]} to run on the CPU")
    if device.type == "cuda" and device.index is not None and device.index >= gpus:
        raise UserError(f"--device {name}: PyTorch sees {gpus} CUDA GPU(s) here, cuda:0 to cuda:{gpus - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: PyTorch sees no Apple GPU (MPS) here; use --device cpu")
    if device.index is not None:
        torch.cuda.set_device(device)  # streams, graphs, free memory and random states follow the current device
    return device


def device_features(device):
    """What the device's type decides. cuda: the step as one CUDA graph, which needs each optimizer's lr as a
    tensor on the device (Adam capturable), and pinned host memory for non-blocking copies; off the CPU the
    channels_last layout (cuDNN's and MPS's fast one). MPS runs the eager step."""
    cuda = device.type == "cuda"
    layout = torch.channels_last if device.type != "cpu" else torch.contiguous_format
    return SimpleNamespace(graphs=cuda, pin_memory=cuda, memory_format=layout)


def setup_processes(args, device):
    """This process's place in the run (rank, device, torchrun's process groups), determinism, and one seed for all."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first call
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = (
            False  # NaN-filling every empty(): no row is read unwritten
        )
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not args.deterministic, args.deterministic
    control = None
    if world_size > 1:
        if device.type == "mps":
            raise UserError("--device mps: torchrun's process groups have no Apple GPU backend; run one process")
        if device.type == "cuda":  # each process takes the GPU of its local rank
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        control = dist.new_group(backend="gloo")  # stop requests and checkpoint gathering, on the CPU
    if args.seed is None:
        seed = [int.from_bytes(os.urandom(4), "little")]
        if control:
            dist.broadcast_object_list(seed, src=0, group=control)
        args.seed = seed[0]
    seed_everything(args.seed)
    return SimpleNamespace(
        rank=rank, size=world_size, ddp=world_size > 1, is_main=rank == 0, device=device, control=control
    )


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(cuda=False):
    """Every global random generator's state (cuda: this process's GPU's too), as types torch.load(weights_only=True)
    accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda else None,
    }


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if torch.cuda.is_available() and torch.is_tensor(cuda):
        torch.cuda.set_rng_state(cuda)


def amp_dtype(device):
    """The autocast type of mixed precision (--amp): bfloat16 where the device computes it natively, float16 (with
    loss scaling) on GPUs without bfloat16, None on MPS and on CPUs without bfloat16 units (there it is many times
    slower than float32)."""
    if device.type == "cuda":  # by default is_bf16_supported also counts bfloat16 emulated on pre-Ampere GPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "mps":  # autocast on MPS has not been checked here: it trains and translates in float32
        return None
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
# The same, translated in tiles (translation.translate_tiled): the residual trunk's tensors at quarter resolution and
# the image, plus one tile (bench/bench_tiles.py measures it).
TILED_BYTES_PER_PIXEL = 400
AUTO_TILE = 512  # px: the tiles of an image that does not fit whole


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


def loader_workers(n_cpu, n_items):
    """DataLoader workers worth starting: at most n_cpu, the CPUs this process may run on, and n_items
    (more only cost start-up time, and make PyTorch warn about excessive worker creation)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(n_cpu, cpus, n_items))
