"""Train CycleGAN (Zhu et al., 2017) on an unpaired two-domain data set.

    python train.py --dataroot datasets/summer2winter_yosemite --cuda
    python train.py --resume                  # continue output/checkpoint.pth exactly where it stopped
    torchrun --nproc_per_node=4 train.py --dataroot datasets/summer2winter_yosemite --cuda   # 4 GPUs, DDP
"""
import argparse
import contextlib
import errno
import functools
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from datasets import EpochSampler, ImageDataset, new_bad_files, skipped_summary
from models import Discriminator, Generator, use_sliced_padding, weights_init_normal
from utils import (Logger, ReplayBuffer, VisdomPlotter, amp_dtype, atomic_save, cannot_write, channels_problem,
                   first_line, linear_decay, load_weights, loader_workers, rng_state, seed_everything,
                   set_requires_grad, set_rng_state, unwrap)

try:
    import fcntl  # one run per output folder (POSIX; elsewhere not enforced)
except ImportError:
    fcntl = None

LOSS_NAMES = ["loss_G", "loss_G_identity", "loss_G_GAN", "loss_G_cycle", "loss_D", "loss_D_A", "loss_D_B"]
# On --resume: flags left at their default take the run's saved value, except LOCAL_FLAGS: where to run, and where
# data goes, come from this command line alone, never from a checkpoint file (which may be someone else's). RUN_FLAGS
# may be given a new value; any other flag given with a new value is refused.
LOCAL_FLAGS = {"cuda", "n_cpu", "output_dir", "resume", "eager", "display_server", "display_port", "display_env"}
RUN_FLAGS = {"epoch", "n_epochs", "decay_epoch", "dataroot", "save_freq", "deterministic", "display_freq", "no_visdom"}
ARCH_FLAGS = {"input_nc", "output_nc", "n_blocks"}
# What a checkpoint holds, checked before any of it is used: a file can pass weights_only and still be anything.
CHECKPOINT_TYPES = {"args": dict, "G_A2B": dict, "G_B2A": dict, "D_A": dict, "D_B": dict, "optimizer_G": dict,
                    "optimizer_D": dict, "lr_scheduler_G": dict, "lr_scheduler_D": dict, "scaler": (dict, type(None)),
                    "fake_A_buffer": (dict, list), "fake_B_buffer": (dict, list), "rng": (dict, list), "step": int,
                    "seconds": (int, float)}
MAX_SIZE = 2048  # --size: 8x the paper's 256 px crops, already ~64x its memory


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback."""


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epoch", type=int, default=0, help="starting epoch (see README: resuming)")
    p.add_argument("--n_epochs", type=int, default=200, help="number of epochs of training")
    p.add_argument("--batchSize", type=int, default=1, help="size of the batches (per process under torchrun)")
    p.add_argument("--dataroot", type=str, default="datasets/summer2winter_yosemite/", help="root directory of the dataset")
    p.add_argument("--lr", type=float, default=0.0002, help="initial learning rate")
    p.add_argument("--decay_epoch", type=int, default=100, help="epoch to start linearly decaying the learning rate to 0")
    p.add_argument("--size", type=int, default=256, help="size of the (square) training crops")
    p.add_argument("--input_nc", type=int, default=3, help="number of channels of input data")
    p.add_argument("--output_nc", type=int, default=3, help="number of channels of output data")
    p.add_argument("--n_blocks", type=int, default=9, help="residual blocks per generator (the authors use 6 up to 128 px)")
    p.add_argument("--cuda", action="store_true", help="use GPU computation")
    p.add_argument("--n_cpu", type=int, default=8, help="number of cpu threads to use during batch generation")
    p.add_argument("--output_dir", type=str, default="output", help="where checkpoints and losses.csv go")
    p.add_argument("--lambda_cycle", type=float, default=10.0, help="weight of the cycle loss, per direction")
    p.add_argument("--lambda_identity", type=float, default=0.5, help="identity loss weight, as a fraction of lambda_cycle")
    p.add_argument("--pool_size", type=int, default=50, help="fakes kept in each discriminator's replay buffer (0: none)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed and saved)")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bfloat16 where the device has it, float16 with loss scaling on older GPUs")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels: a --seed run, and its resumption, repeat bit for bit (slower)")
    p.add_argument("--eager", action="store_true", help="on CUDA, run the step op by op instead of as one CUDA graph")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from OUTPUT_DIR/checkpoint.pth, or from PATH")
    p.add_argument("--save_freq", type=int, default=1000, help="also checkpoint every this many steps (0: epoch ends only)")
    p.add_argument("--display_server", type=str, default="http://localhost", help="visdom server")
    p.add_argument("--display_port", type=int, default=8097, help="visdom port")
    p.add_argument("--display_env", type=str, default=None, help="visdom environment (default: DATASET_OUTPUTDIR)")
    p.add_argument("--display_freq", type=int, default=100, help="steps between loss rows, progress lines and plots")
    p.add_argument("--no_visdom", action="store_true", help="do not plot to visdom (losses.csv is still written)")
    return p


def check_args(args, resuming=False):
    """UserError naming the first flag whose value cannot work, and what would."""
    if args.n_epochs < 1 or not 0 <= args.decay_epoch < args.n_epochs:
        raise UserError(f"--decay_epoch ({args.decay_epoch}) must be at least 0 and below --n_epochs ({args.n_epochs})")
    if args.epoch < 0 or (not resuming and args.epoch >= args.n_epochs):
        raise UserError(f"--epoch {args.epoch}: a new run starts at an epoch from 0 to --n_epochs - 1 "
                        f"({args.n_epochs - 1}); to continue a run use --resume")
    if not 24 <= args.size <= MAX_SIZE or args.size % 4:
        raise UserError(f"--size {args.size}: the generator needs a multiple of 4, the discriminator at least 24, "
                        f"and memory grows with its square: at most {MAX_SIZE} (the paper trains at 256)")
    for flag in ("lr", "lambda_cycle", "lambda_identity"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0 or (flag == "lr" and value == 0):
            raise UserError(f"--{flag} {value}: must be a finite number " + ("above 0 (the paper's is 0.0002)"
                                                                              if flag == "lr" else "of 0 or more"))
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UserError(f"--seed {args.seed}: must be a whole number from 0 to 2**63 - 1")
    if channels_problem(args):
        raise UserError(channels_problem(args))
    if not 0 < args.display_port < 65536:
        raise UserError(f"--display_port {args.display_port}: a port is a number from 1 to 65535")
    if args.input_nc != args.output_nc and args.lambda_identity > 0:
        raise UserError("the identity loss feeds B images to G_A2B, so it needs --input_nc == --output_nc; "
                        "pass --lambda_identity 0")
    if args.cuda and not torch.cuda.is_available():
        raise UserError("--cuda was given but PyTorch sees no CUDA GPU; drop --cuda to train on the CPU")
    if args.n_blocks > 64:  # the paper has 9; each costs 2.4 MB of weights and a full-size activation per image
        raise UserError(f"--n_blocks {args.n_blocks}: at most 64 residual blocks (the paper uses 9, or 6 up to 128 px)")
    if min(args.batchSize, args.display_freq, args.n_blocks) < 1 or min(args.save_freq, args.pool_size, args.n_cpu) < 0:
        raise UserError("--batchSize, --display_freq and --n_blocks must be positive, --save_freq, --pool_size and "
                        "--n_cpu at least 0")


def load_checkpoint(args):
    """The checkpoint to resume from (or None), with args merged: the run's flags unless given anew here."""
    path = Path(args.output_dir) / "checkpoint.pth" if args.resume in (None, "latest") else Path(args.resume)
    if args.resume is None:
        for existing in (path, path.with_name("netG_A2B.pth")):
            if existing.exists():
                raise UserError(f"{existing} holds a run already: continue it with --resume, "
                                f"or pick another --output_dir")
        return None
    if not path.is_file():
        raise UserError(f"no checkpoint at {path} to resume from" + (" (pass --output_dir of the run, or --resume PATH)"
                                                                    if args.resume == "latest" else ""))
    try:
        ckpt = load_weights(path)
    except ValueError as e:
        raise UserError(f"{e}; --resume takes a checkpoint.pth written by train.py") from None
    wrong = checkpoint_problem(ckpt)
    if wrong:
        raise UserError(f"{path} is not a checkpoint of train.py: {wrong}")
    saved = ckpt["args"]
    defaults = vars(get_parser().parse_args([]))
    given = {k for k, v in vars(args).items() if v != defaults[k]}
    changed = {k for k in given - RUN_FLAGS - LOCAL_FLAGS if k in saved and getattr(args, k) != saved[k]}
    if changed:
        kind = "architecture" if changed & ARCH_FLAGS else "training"
        raise UserError(f"{path} was trained with other {kind} flags: " +
                        ", ".join(f"--{k} {saved[k]} (given {getattr(args, k)})" for k in sorted(changed)) +
                        "; drop them to resume, or start a new run in another --output_dir")
    for k in saved.keys() & defaults.keys() - given - LOCAL_FLAGS:
        setattr(args, k, saved[k])
    return ckpt


def checkpoint_problem(ckpt):
    """What is wrong with a loaded checkpoint's layout (a missing key, a value of the wrong type), or None."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a dict"
    for key, kind in CHECKPOINT_TYPES.items():
        if key not in ckpt:
            return f"it has no {key!r}"
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            return f"its {key!r} is a {type(ckpt[key]).__name__}"
    kinds = {a.dest: a.type or type(a.const) for a in get_parser()._actions if a.dest != "help"}
    for key, value in ckpt["args"].items():
        kind = kinds.get(key)
        if kind and value is not None and type(value) is not kind and not (kind is float and type(value) is int):
            return f"its flag {key} is {value!r}, not a {kind.__name__}"
    return None


# ---- The objective: each update's whole loss is one module's forward, so DDP sees one forward per backward ----

class GeneratorLoss(nn.Module):
    """Both generators' loss for a batch. The discriminators are inputs, frozen by the caller, not parameters."""

    def __init__(self, G_A2B, G_B2A, lambda_cycle, lambda_identity):
        super().__init__()
        self.G_A2B, self.G_B2A = G_A2B, G_B2A
        self.lambda_cycle, self.lambda_identity = lambda_cycle, lambda_identity

    def forward(self, real_A, real_B, D_A, D_B):
        identity = self.lambda_identity > 0
        fake_B, idt_B = generate(self.G_A2B, real_A, real_B, identity)
        fake_A, idt_A = generate(self.G_B2A, real_B, real_A, identity)
        rec_A, rec_B = self.G_B2A(fake_B), self.G_A2B(fake_A)
        loss_G_GAN = lsgan(D_B(fake_B), 1.0) + lsgan(D_A(fake_A), 1.0)
        loss_G_cycle = self.lambda_cycle * (F.l1_loss(rec_A, real_A) + F.l1_loss(rec_B, real_B))
        loss_G_identity = (self.lambda_cycle * self.lambda_identity * (F.l1_loss(idt_A, real_A) + F.l1_loss(idt_B, real_B))
                           if identity else real_A.new_zeros((), dtype=torch.float32))
        loss_G = loss_G_GAN + loss_G_cycle + loss_G_identity
        return (loss_G, loss_G_identity, loss_G_GAN, loss_G_cycle), (fake_A, fake_B, rec_A, rec_B)


class DiscriminatorLoss(nn.Module):
    """LSGAN loss of each discriminator: real -> 1, fake -> 0, halved as in the paper to slow D down."""

    def __init__(self, D_A, D_B):
        super().__init__()
        self.D_A, self.D_B = D_A, D_B

    def forward(self, real_A, real_B, fake_A, fake_B):
        loss_D_A = 0.5 * (lsgan(self.D_A(real_A), 1.0) + lsgan(self.D_A(fake_A), 0.0))
        loss_D_B = 0.5 * (lsgan(self.D_B(real_B), 1.0) + lsgan(self.D_B(fake_B), 0.0))
        return loss_D_A, loss_D_B


def train_step(g_loss, d_loss, discriminators, optimizer_G, optimizer_D, scaler, autocast, buffers,
               real_A, real_B, choices_A, choices_B):
    """One CycleGAN update: both generators, then both discriminators. Returns the losses as one (7,) tensor in
    LOSS_NAMES order, and (fake_A, fake_B, rec_A, rec_B). No host sync inside: CUDA can replay it as one graph.

    choices_*: the replay buffers' draws for this batch (ReplayBuffer.draw), made before the step."""
    D_A, D_B = discriminators
    fake_A_buffer, fake_B_buffer = buffers

    # ---- Generators: minimise GAN + lambda_cycle * cycle + lambda_cycle * lambda_identity * identity, D frozen ----
    set_requires_grad(discriminators, False)
    optimizer_G.zero_grad(set_to_none=True)
    with autocast:
        (loss_G, loss_G_identity, loss_G_GAN, loss_G_cycle), (fake_A, fake_B, rec_A, rec_B) = g_loss(real_A, real_B, D_A, D_B)
    scaler.scale(loss_G).backward()
    scaler.step(optimizer_G)

    # ---- Discriminators: minimise 0.5 * [(D(real) - 1)^2 + D(fake)^2], the fakes through the replay buffers ----
    set_requires_grad(discriminators, True)
    optimizer_D.zero_grad(set_to_none=True)
    with autocast:
        loss_D_A, loss_D_B = d_loss(real_A, real_B, fake_A_buffer.push_and_pop(fake_A, choices_A),
                                    fake_B_buffer.push_and_pop(fake_B, choices_B))
        loss_D = loss_D_A + loss_D_B
    scaler.scale(loss_D).backward()
    scaler.step(optimizer_D)
    scaler.update()

    losses = [loss_G, loss_G_identity, loss_G_GAN, loss_G_cycle, loss_D, loss_D_A, loss_D_B]
    # Detached: an output with its grad_fn would keep parts of this step's graph alive through the next step.
    return torch.stack([x.detach().float() for x in losses]), tuple(x.detach() for x in (fake_A, fake_B, rec_A, rec_B))


def generate(G, x, y, identity):
    """G(x), and G(y) for the identity loss, from one batched pass: InstanceNorm keeps the samples independent."""
    if not identity:
        return G(x), None
    return G(torch.cat([x, y])).chunk(2)


def lsgan(pred, target):
    """Least-squares GAN loss on every patch of the (B, 1, H/8 - 2, W/8 - 2) map, towards a constant target."""
    return F.mse_loss(pred, torch.full_like(pred, target))


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


def build(args, device, rank=0):
    """The run's networks, optimizers, precision and replay buffers on `device`, freshly initialised.

    Off the CPU (CUDA, or the meta device of tests/test_devices.py) the networks are channels_last (cuDNN's native
    layout) and each optimizer's lr is a tensor on the device: eager and captured steps compute the same numbers."""
    nets = {"G_A2B": Generator(args.input_nc, args.output_nc, args.n_blocks),
            "G_B2A": Generator(args.output_nc, args.input_nc, args.n_blocks),
            "D_A": Discriminator(args.input_nc), "D_B": Discriminator(args.output_nc)}
    accelerator = device.type != "cpu"
    memory_format = torch.channels_last if accelerator else torch.contiguous_format
    for net in nets.values():
        net.apply(weights_init_normal)
        if args.deterministic:
            use_sliced_padding(net)
        net.to(device, memory_format=memory_format)
    G_A2B, G_B2A, D_A, D_B = nets.values()
    dtype = amp_dtype(device) if args.amp else None
    return SimpleNamespace(
        nets=nets, memory_format=memory_format, dtype=dtype,
        optimizer_G=adam([*G_A2B.parameters(), *G_B2A.parameters()], args.lr, device, lr_tensor=accelerator),
        optimizer_D=adam([*D_A.parameters(), *D_B.parameters()], args.lr, device, lr_tensor=accelerator),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        autocast=torch.autocast(device.type, dtype, cache_enabled=False) if dtype else contextlib.nullcontext(),
        # Each rank keeps its own replay buffers; rank 0's are seeded as in a single-process run.
        buffers=(ReplayBuffer(args.pool_size, args.seed + 2 * rank), ReplayBuffer(args.pool_size, args.seed + 2 * rank + 1)))


def restore(run, ckpt, rank, device):
    """Put a checkpoint's weights, optimizer and scaler states, and this rank's replay buffers and random states,
    into the built run; returns how many processes the checkpointed run had."""
    for name, net in run.nets.items():
        net.load_state_dict(ckpt[name])  # copied into the parameters: their device and layout stay
    load_optimizer(run.optimizer_G, ckpt["optimizer_G"])
    load_optimizer(run.optimizer_D, ckpt["optimizer_D"])
    if ckpt["scaler"] and run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    per_rank = {k: ckpt[k] if isinstance(ckpt[k], list) else [ckpt[k]] for k in ("fake_A_buffer", "fake_B_buffer", "rng")}
    if rank < len(per_rank["rng"]):
        for buffer, key in zip(run.buffers, ("fake_A_buffer", "fake_B_buffer")):
            buffer.load_state_dict(per_rank[key][rank], device, run.memory_format)
        set_rng_state(per_rank["rng"][rank])
    return len(per_rank["rng"])


def make_step(run, args, ddp=False):
    """train_step bound to the run: its losses (each wrapped in DDP under torchrun), optimizers, precision, buffers;
    a function of (real_A, real_B, choices_A, choices_B)."""
    G_A2B, G_B2A, D_A, D_B = run.nets.values()
    g_loss, d_loss = GeneratorLoss(G_A2B, G_B2A, args.lambda_cycle, args.lambda_identity), DiscriminatorLoss(D_A, D_B)
    if ddp:  # each wrapped forward computes a whole loss: no network runs twice inside one DDP forward-backward
        g_loss, d_loss = DDP(g_loss), DDP(d_loss)
    return functools.partial(train_step, g_loss, d_loss, (D_A, D_B), run.optimizer_G, run.optimizer_D, run.scaler,
                             run.autocast, run.buffers)


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


def load_optimizer(optimizer, state):
    """Load a saved Adam state under this run's settings (fused, capturable, lr type), whichever device saved it."""
    ours = optimizer.param_groups
    groups = [{**saved, **{k: g[k] for k in ("fused", "capturable", "foreach", "lr")}}
              for saved, g in zip(state["param_groups"], ours)]
    optimizer.load_state_dict({**state, "param_groups": groups})
    for p, s in optimizer.state.items():  # moments in the parameter's memory format (channels_last on CUDA)
        s.update({k: torch.empty_like(p).copy_(v) for k, v in s.items() if torch.is_tensor(v) and v.shape == p.shape})


def cpu_state(net):
    """A plain fp32 state_dict on the CPU in the default memory format: the seed's format, loadable anywhere."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format) for k, v in unwrap(net).state_dict().items()}


def main(args):
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ddp, is_main = world_size > 1, rank == 0  # launched by torchrun with several processes?
    out = Path(args.output_dir)
    lock = lock_output_dir(out) if is_main and out.is_dir() else None  # held (open) until the process ends
    ckpt = load_checkpoint(args)
    check_args(args, resuming=ckpt is not None)  # after the merge: a resumed run's flags with what was given anew
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(cannot_write(out, e)) from None
    lock = lock or (lock_output_dir(out) if is_main else None)
    log = print if is_main else (lambda *a, **k: None)

    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first call
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every empty(): no row is read unwritten
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not args.deterministic, args.deterministic
    device, control = torch.device("cuda" if args.cuda else "cpu"), None
    if ddp:
        if args.cuda:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if args.cuda else "gloo")
        control = dist.new_group(backend="gloo")  # stop requests and checkpoint gathering, on the CPU
    if args.seed is None:
        seed = [int.from_bytes(os.urandom(4), "little")]
        if ddp:
            dist.broadcast_object_list(seed, src=0, group=control)  # one seed for all ranks
        args.seed = seed[0]
    seed_everything(args.seed)

    # ---- Networks, optimizers, precision, replay buffers; a checkpoint's state put into them ----
    run = build(args, device, rank)
    if args.amp and run.dtype is None:
        log("--amp: this CPU has no bfloat16 units (bfloat16 would be many times slower), so training runs in float32")
    nets, optimizer_G, optimizer_D, scaler = run.nets, run.optimizer_G, run.optimizer_D, run.scaler
    fake_A_buffer, fake_B_buffer = run.buffers
    capture = device.type == "cuda" and not (args.eager or ddp or scaler.is_enabled())
    try:
        saved_ranks = restore(run, ckpt, rank, device) if ckpt is not None else None
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # a damaged or foreign file
        raise UserError(f"{args.resume if args.resume != 'latest' else out / 'checkpoint.pth'} does not fit these "
                        f"networks ({type(e).__name__}: {first_line(e)[:200]}): is it a checkpoint of train.py?") from None

    try:
        dataset = ImageDataset(args.dataroot, args.size, args.input_nc, args.output_nc, seed=args.seed)
    except ValueError as e:
        raise UserError(e) from None
    if dataset.skipped:
        log(skipped_summary(dataset.skipped), file=sys.stderr)
    seen_bad = set()  # files that failed to decode, each reported once (workers cannot know what others saw)
    steps_per_epoch = math.ceil(math.ceil(len(dataset) / world_size) / args.batchSize)
    step, start_epoch, start_sample, seconds = 0, args.epoch, 0, 0.0
    if ckpt is not None:
        step, seconds = ckpt["step"], ckpt["seconds"]
        # Where in the data: (epoch, samples of it taken by all ranks); older checkpoints count steps of one process.
        start_epoch, start_sample = ckpt.get("position", divmod(step, steps_per_epoch))
        start_sample *= 1 if "position" in ckpt else args.batchSize
        if start_epoch >= args.n_epochs:
            log(f"all {args.n_epochs} epochs of this run are done ({step} steps); "
                f"to train longer, resume with a larger --n_epochs")
            return 0
        if saved_ranks != world_size:
            log(f"the run had {saved_ranks} process(es), this one has {world_size}: ranks beyond the run's "
                f"start with empty replay buffers, and each epoch now takes {steps_per_epoch} steps")
        log(f"resuming from epoch {start_epoch + 1}, step {step} (seed {args.seed})")
    elif args.epoch:
        log(f"--epoch {args.epoch}: a NEW run whose learning-rate schedule starts at epoch {args.epoch}; "
            f"to continue a run use --resume")
    else:
        log(f"new run, seed {args.seed}" + f", {world_size} processes" * ddp)
    for group in optimizer_G.param_groups + optimizer_D.param_groups:
        group["initial_lr"] = args.lr
    lr_lambda = linear_decay(args.n_epochs, args.decay_epoch)
    lr_scheduler_G = torch.optim.lr_scheduler.LambdaLR(optimizer_G, lr_lambda, last_epoch=start_epoch - 1)
    lr_scheduler_D = torch.optim.lr_scheduler.LambdaLR(optimizer_D, lr_lambda, last_epoch=start_epoch - 1)
    if ckpt is not None:
        lr_scheduler_G.load_state_dict(ckpt["lr_scheduler_G"])
        lr_scheduler_D.load_state_dict(ckpt["lr_scheduler_D"])

    # ---- The step: one function; DDP wraps its two losses, CUDA replays it as one graph ----
    eager_step = make_step(run, args, ddp)
    fast_step = CudaGraphStep(eager_step) if capture else eager_step  # a smaller last batch runs eagerly
    if device.type == "cuda" and not capture:
        log("the step runs eagerly: " + ("--eager" if args.eager else "DDP" if ddp else "float16 loss scaling"))

    sampler = EpochSampler(len(dataset), args.seed, rank, world_size)
    workers = loader_workers(args.n_cpu, len(dataset))
    # Workers ignore Ctrl-C / SIGTERM so the main process can finish its step and save; their own
    # generator keeps the loader from drawing on the global torch RNG.
    loader = DataLoader(dataset, batch_size=args.batchSize, sampler=sampler, num_workers=workers,
                        pin_memory=args.cuda, worker_init_fn=ignore_signals, generator=torch.Generator(),
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    env = args.display_env or f"{Path(args.dataroot.rstrip('/')).name}_{out.resolve().name}"
    plotter = None if args.no_visdom or not is_main else VisdomPlotter(args.display_server, args.display_port, env, LOSS_NAMES)
    average = (lambda x: (dist.all_reduce(x), x / world_size)[1]) if ddp else None  # losses shown: mean over ranks
    logger = Logger(out if is_main else None, LOSS_NAMES, args.batchSize * world_size, steps_per_epoch * args.n_epochs,
                    step, seconds, plotter, window=args.display_freq, average=average)

    def save_checkpoint(position, epochs_done):
        """Everything the run needs to continue bit for bit, in one atomically written file by rank 0 (every rank's
        replay buffers and random states gathered to it); False if the write failed."""
        mine = {"fake_A_buffer": fake_A_buffer.state_dict(), "fake_B_buffer": fake_B_buffer.state_dict(),
                "rng": rng_state(device.type == "cuda")}
        ranks = [mine]
        if ddp:
            ranks = [None] * world_size if is_main else None
            dist.gather_object(mine, ranks, dst=0, group=control)
        ok = True
        if is_main:
            state = {**{name: cpu_state(net) for name, net in nets.items()},
                     "optimizer_G": optimizer_G.state_dict(), "optimizer_D": optimizer_D.state_dict(),
                     "lr_scheduler_G": lr_scheduler_G.state_dict(), "lr_scheduler_D": lr_scheduler_D.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     **{k: [r[k] for r in ranks] for k in mine},
                     "step": step, "position": list(position), "epoch": epochs_done,
                     "world_size": world_size, "seconds": logger.seconds(), "args": vars(args)}
            ok = try_save(state, out / "checkpoint.pth")
        if ddp:
            dist.barrier(group=control)  # the others wait for the save
        return ok

    saved, stop = True, []  # SIGINT/SIGTERM: finish the step, save, exit; a second Ctrl-C exits at once

    def request_stop(signum, frame):
        name = signal.Signals(signum).name
        if stop and name == "SIGINT" == stop[0]:  # not SIGTERM: torchrun sends one on Ctrl-C after the SIGINT
            print("quitting without saving", file=sys.stderr)
            raise SystemExit(130)
        if not stop:
            stop.append(name)
            print(f"\n{name}: stopping after this step (Ctrl-C again to quit without saving)", file=sys.stderr)

    launcher = os.getppid()  # torchrun: its workers run in their own sessions and would outlive it

    def stop_requested():
        """Whether to stop after this step: a signal here or, under DDP, on any rank (all stop after the same step)."""
        if not ddp:
            return bool(stop)
        if os.getppid() != launcher and not stop:
            stop.append("launcher gone")
            print(f"rank {rank}: torchrun (pid {launcher}) is gone: stopping after this step", file=sys.stderr)
        flag = torch.tensor([int(bool(stop))])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
        return bool(flag.item())

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    stopped = False
    for epoch in range(start_epoch, args.n_epochs):
        sampler.set_epoch(epoch, start_sample)
        n_steps = len(loader)  # this epoch's steps from here on, the same on every rank
        logger.begin_epoch(epoch, args.n_epochs, steps_per_epoch - n_steps, steps_per_epoch)
        for i, batch in enumerate(loader, 1):
            for line in new_bad_files(batch["bad"], seen_bad):
                print(f"{line}; replaced by another image", file=sys.stderr)
            real_A, real_B, choices_A, choices_B = to_device(batch, run.buffers, device, run.memory_format)
            step_fn = fast_step if len(real_A) == args.batchSize else eager_step
            losses, (fake_A, fake_B, rec_A, rec_B) = step_fn(real_A, real_B, choices_A, choices_B)
            step += 1
            logger.step(losses)

            epoch_end = i == n_steps
            position = (epoch + 1, 0) if epoch_end else (epoch, start_sample + i * args.batchSize * world_size)
            epochs_done = position[0] + position[1] / len(dataset)
            stopped = stop_requested()
            save_now = epoch_end or stopped or (args.save_freq and step % args.save_freq == 0)
            if step % args.display_freq == 0 or save_now:
                images = {"real_A": real_A[0], "fake_B": fake_B[0], "rec_A": rec_A[0],
                          "real_B": real_B[0], "fake_A": fake_A[0], "rec_B": rec_B[0]}
                try:  # checks every loss is finite, before anything is saved
                    logger.flush(step, epochs_done, args.lr * lr_lambda(lr_scheduler_G.last_epoch), images)
                except FloatingPointError as e:
                    logger.close()
                    kept = (f"{out / 'checkpoint.pth'} holds the last good state" if (out / "checkpoint.pth").exists()
                            else "no checkpoint had been written yet")
                    raise UserError(f"{e}; stopped without saving: {kept} (try a lower --lr, or drop --amp)") from None
            if epoch_end:
                lr_scheduler_G.step()
                lr_scheduler_D.step()
            if save_now:
                saved = save_checkpoint(position, epochs_done)
            if stopped:
                break
        logger.end_epoch()
        start_sample = 0
        if stopped:
            break
        if is_main:  # the seed's four files, loadable by its code and by test.py
            for name, net in nets.items():
                try_save(cpu_state(net), out / f"net{name}.pth")
    logger.close()
    if not saved:
        raise UserError(f"the last checkpoint could not be written; free space in {out} and run: {resume_command(args)}")
    if stopped:
        log(f"stopped at step {step}; continue with:\n  {resume_command(args)}")
    else:
        log(f"done: {args.n_epochs} epochs, {step} steps; generators in {out}/netG_A2B.pth and netG_B2A.pth")
    if ddp:
        dist.destroy_process_group()
    return 0


def try_save(obj, path):
    """atomic_save that reports a failure (disk full, permissions) instead of raising: the old file stays whole."""
    try:
        atomic_save(obj, path)
        return True
    except OSError as e:
        print(f"could not write {path} ({e}); the previous file is intact", file=sys.stderr)
        return False


def lock_output_dir(out):
    """Hold an exclusive lock on OUTPUT_DIR/.lock while this process lives (the kernel drops it when the process
    dies, however it dies); UserError naming the holder if another run has it."""
    if fcntl is None:
        return None
    path = out / ".lock"
    if path.is_symlink():  # planted: the lock file is ours to write, never a link's target
        path.unlink()
    try:
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as e:
        raise UserError(cannot_write(out, e)) from None
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a POSIX lock: loader workers (forks) do not inherit it
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{out} is in use by a running train.py ({holder}): wait for it, stop it, "
                        f"or pick another --output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def ignore_signals(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_children():
    """Kill the loader's worker processes: they ignore SIGTERM (see ignore_signals), so the exit handler of
    multiprocessing, which terminates and then joins them, would wait forever after an error."""
    if hasattr(signal, "SIGCHLD"):  # the loader's SIGCHLD handler would raise at the first death
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(5)


def resume_command(args):
    world_size, per_node = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    launcher = ("python train.py" if world_size == 1 else f"torchrun --nproc_per_node={world_size} train.py"
                if per_node == world_size else "torchrun <the same launch flags> train.py")
    return f"{launcher} --resume --output_dir {args.output_dir}" + " --cuda" * args.cuda


if __name__ == "__main__":
    try:
        code = main(get_parser().parse_args())
    except UserError as e:
        code = f"error: {e}"
    except torch.cuda.OutOfMemoryError:
        code = "error: out of GPU memory: use a smaller --batchSize or --size (or --amp)"
    finally:
        stop_children()
    sys.exit(code)
