"""What a training run is, and what its checkpoint holds: the networks, optimizers, lr schedules, loss scaler,
replay buffers, random states and its place in the data, built as the paper sets them up (build), written as one dict
of plain types (checkpoint) and put back (restore), side by side so that nothing is saved that is not restored."""

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoints import cpu_state, load_optimizer, try_save
from models import discriminator, generator, use_sliced_padding, weights_init_normal
from runtime import adam, amp_dtype, device_features, rng_state, set_rng_state
from utils import ReplayBuffer, linear_decay

# What a checkpoint holds, checked before any of it is used: a file can pass weights_only and still be anything.
CHECKPOINT_TYPES = {
    "args": dict,
    "G_A2B": dict,
    "G_B2A": dict,
    "D_A": dict,
    "D_B": dict,
    "optimizer_G": dict,
    "optimizer_D": dict,
    "lr_scheduler_G": dict,
    "lr_scheduler_D": dict,
    "scaler": (dict, type(None)),
    "fake_A_buffer": (dict, list),
    "fake_B_buffer": (dict, list),
    "rng": (dict, list),
    "step": int,
    "seconds": (int, float),
}


@dataclass
class Run:
    """A run's state, made fresh by build(): what checkpoint() saves and restore() puts back, side by side below."""

    nets: dict  # G_A2B, G_B2A, D_A, D_B
    optimizer_G: torch.optim.Optimizer
    optimizer_D: torch.optim.Optimizer
    lr_scheduler_G: torch.optim.lr_scheduler.LambdaLR
    lr_scheduler_D: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    buffers: tuple  # this rank's replay buffers of fake_A and fake_B
    step: int = 0  # steps taken, over resumes
    epoch: int = 0  # the position in the data: (epoch, samples of it taken by all ranks)
    sample: int = 0
    seconds: float = 0.0  # training time, over resumes
    # How the run computes, not state: set by build() from the flags and the device.
    device: torch.device = torch.device("cpu")
    memory_format: torch.memory_format = torch.contiguous_format
    dtype: torch.dtype = None
    autocast: object = contextlib.nullcontext()
    lr_lambda: object = None
    epoch_size: int = 1  # samples per epoch: max(|A|, |B|)


def build(args, device, rank=0, epoch_size=1):
    """A fresh Run on `device`: networks initialised as the paper, optimizers, schedules, precision, replay buffers.

    Off the CPU the networks are channels_last; on CUDA (or the meta device standing in for it in
    tests/test_devices.py) each optimizer's lr is a tensor on the device: eager and captured steps compute the same
    numbers."""
    nets = {
        "G_A2B": generator(args.input_nc, args.output_nc, args.n_blocks, args.attention),
        "G_B2A": generator(args.output_nc, args.input_nc, args.n_blocks, args.attention),
        "D_A": discriminator(args.input_nc, args.d_scales),
        "D_B": discriminator(args.output_nc, args.d_scales),
    }
    features = device_features(device)
    memory_format = features.memory_format
    for net in nets.values():
        net.apply(weights_init_normal)
        if args.deterministic:
            use_sliced_padding(net)
        net.to(device, memory_format=memory_format)
    G_A2B, G_B2A, D_A, D_B = nets.values()
    optimizer_G = adam([*G_A2B.parameters(), *G_B2A.parameters()], args.lr, device, lr_tensor=features.graphs)
    optimizer_D = adam([*D_A.parameters(), *D_B.parameters()], args.lr, device, lr_tensor=features.graphs)
    for group in optimizer_G.param_groups + optimizer_D.param_groups:
        group["initial_lr"] = args.lr  # the schedule's base
    lr_lambda = linear_decay(args.n_epochs, args.decay_epoch)
    dtype = amp_dtype(device) if args.amp else None
    return Run(
        nets,
        optimizer_G,
        optimizer_D,
        schedule(optimizer_G, lr_lambda, args.epoch),
        schedule(optimizer_D, lr_lambda, args.epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        # Each rank keeps its own replay buffers; rank 0's are seeded as in a single-process run. --attention's
        # discriminators learn from two fakes per image: the content and the blend (losses.AttentionLoss).
        buffers=tuple(
            ReplayBuffer(args.pool_size, args.seed + 2 * rank + k, per_image=2 if args.attention else 1) for k in (0, 1)
        ),
        epoch=args.epoch,
        device=device,
        memory_format=memory_format,
        dtype=dtype,
        lr_lambda=lr_lambda,
        autocast=torch.autocast(device.type, dtype, cache_enabled=False) if dtype else contextlib.nullcontext(),
        epoch_size=epoch_size,
    )


def schedule(optimizer, lr_lambda, epoch):
    """The paper's lr schedule for `optimizer`, at `epoch` (a tensor lr is filled in place: a captured graph reads
    it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda, last_epoch=epoch - 1)


def rank_state(run):
    """This rank's own part of a checkpoint: its replay buffers and random states."""
    return {
        "fake_A_buffer": run.buffers[0].state_dict(),
        "fake_B_buffer": run.buffers[1].state_dict(),
        "rng": rng_state(run.device.type == "cuda"),
    }


def checkpoint(run, args, ranks):
    """Everything the run needs to continue bit for bit, as one dict of plain types; ranks: every rank's rank_state."""
    return {
        **{name: cpu_state(net) for name, net in run.nets.items()},
        "optimizer_G": run.optimizer_G.state_dict(),
        "optimizer_D": run.optimizer_D.state_dict(),
        "lr_scheduler_G": run.lr_scheduler_G.state_dict(),
        "lr_scheduler_D": run.lr_scheduler_D.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        **{key: [r[key] for r in ranks] for key in ranks[0]},
        "step": run.step,
        "position": [run.epoch, run.sample],
        "epoch": run.epoch + run.sample / run.epoch_size,
        "world_size": len(ranks),
        "device": run.device.type,  # a resume without --device on a machine with this kind of GPU is refused
        "seconds": run.seconds,
        "args": vars(args),
    }


def restore(run, ckpt, args, rank=0, world_size=1):
    """checkpoint()'s inverse: put a checkpoint into a built Run (this rank's replay buffers and random states, if
    the checkpointed run had this rank); returns how many processes it had."""
    for name, net in run.nets.items():
        net.load_state_dict(ckpt[name])  # copied into the parameters: their device and layout stay
    load_optimizer(run.optimizer_G, ckpt["optimizer_G"])
    load_optimizer(run.optimizer_D, ckpt["optimizer_D"])
    if ckpt["scaler"] and run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    per_rank = {
        k: ckpt[k] if isinstance(ckpt[k], list) else [ckpt[k]] for k in ("fake_A_buffer", "fake_B_buffer", "rng")
    }
    if rank < len(per_rank["rng"]):
        for buffer, key in zip(run.buffers, ("fake_A_buffer", "fake_B_buffer")):
            buffer.load_state_dict(per_rank[key][rank], run.device, run.memory_format)
        set_rng_state(per_rank["rng"][rank])
    run.step, run.seconds = ckpt["step"], ckpt["seconds"]
    if "position" in ckpt:
        run.epoch, run.sample = ckpt["position"]
    else:  # older checkpoints count the steps of one process
        run.epoch, steps = divmod(run.step, steps_per_epoch(run, args, world_size))
        run.sample = steps * args.batchSize
    # The schedules at the restored epoch under this command's --n_epochs / --decay_epoch, then their saved state.
    run.lr_scheduler_G = schedule(run.optimizer_G, run.lr_lambda, run.epoch)
    run.lr_scheduler_D = schedule(run.optimizer_D, run.lr_lambda, run.epoch)
    run.lr_scheduler_G.load_state_dict(ckpt["lr_scheduler_G"])
    run.lr_scheduler_D.load_state_dict(ckpt["lr_scheduler_D"])
    return len(per_rank["rng"])


def save_checkpoint(run, args, world):
    """checkpoint(run) written atomically by rank 0, every rank's own state gathered to it; False if the write
    failed."""
    ranks = [rank_state(run)]
    if world.ddp:
        mine, ranks = ranks[0], [None] * world.size if world.is_main else None
        dist.gather_object(mine, ranks, dst=0, group=world.control)
    ok = try_save(checkpoint(run, args, ranks), Path(args.output_dir) / "checkpoint.pth") if world.is_main else True
    if world.ddp:
        dist.barrier(group=world.control)  # the others wait for the save
    return ok


def steps_per_epoch(run, args, world_size):
    """Steps of each process per epoch: the epoch's samples shared out over the ranks, then batched."""
    return math.ceil(math.ceil(run.epoch_size / world_size) / args.batchSize)
