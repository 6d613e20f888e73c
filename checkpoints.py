"""What a run keeps on disk: weights and checkpoints written atomically, read and checked, the flags a resumed run
takes from its checkpoint, and the output folder's lock."""

import argparse
import errno
import os
import pickle
import re
import shlex
import socket
import sys
import time
from pathlib import Path

import torch

from files import shown, write_atomic
from utils import UserError, cannot_write, first_line

try:
    import fcntl  # one run per output folder (POSIX; elsewhere not enforced)
except ImportError:
    fcntl = None


def load_weights(path):
    """torch.load onto the CPU of tensors and plain containers only (weights_only). FileNotFoundError if path does not
    exist; ValueError, in one line, if it is empty, not a PyTorch file, or holds other Python objects, which are
    refused unread (unpickling them could run any code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:  # torch's message is a page of advice; the line that matters is in it
        # "Unsupported global: GLOBAL x.y" or "... GLOBAL x.y whose ..."
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not refused:  # no pickle of ours at all: text, an image, a truncated file
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise ValueError(
                f"{shown(path)} is not a PyTorch weights file ({why[1] if why else first_line(e)[:200]})"
            ) from None
        raise ValueError(
            f"{shown(path)} holds pickled Python objects besides tensors ({refused[1]}), refused "
            f"unread because loading them could run code: it was not saved by this repository"
        ) from None
    except Exception as e:
        why = (
            "the file is empty"
            if Path(path).is_file() and Path(path).stat().st_size == 0
            else f"{type(e).__name__}: {first_line(e)[:200]}"
        )
        raise ValueError(f"{shown(path)} is not a PyTorch weights file ({why})") from None


def atomic_save(obj, path):
    """torch.save via a temporary file, fsync and os.replace: a crash or a full disk mid-write leaves the old file
    whole."""
    write_atomic(path, lambda f: torch.save(obj, f), durable=True)


def try_save(obj, path):
    """atomic_save that reports a failure (disk full, permissions) instead of raising: the old file stays whole."""
    try:
        atomic_save(obj, path)
        return True
    except OSError as e:
        print(f"could not write {path} ({e}); the previous file is intact", file=sys.stderr)
        return False


def unwrap(model):
    """The plain module under DDP / torch.compile wrappers, so saved keys carry no module. / _orig_mod. prefix."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def cpu_state(net):
    """A plain fp32 state_dict on the CPU in the default memory format: the seed's format, loadable anywhere."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format) for k, v in unwrap(net).state_dict().items()}


def load_optimizer(optimizer, state):
    """Load a saved Adam state under this run's settings (fused, capturable, lr type), whichever device saved it."""
    ours = optimizer.param_groups
    groups = [
        {**saved, **{k: g[k] for k in ("fused", "capturable", "foreach", "lr")}}
        for saved, g in zip(state["param_groups"], ours)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})
    for p, s in optimizer.state.items():  # moments in the parameter's memory format (channels_last on CUDA)
        s.update({k: torch.empty_like(p).copy_(v) for k, v in s.items() if torch.is_tensor(v) and v.shape == p.shape})


# On --resume: flags not typed on the command line take the run's saved value, except LOCAL_FLAGS: where to run, and
# where data goes, come from this command line alone, never from a checkpoint file (which may be someone else's).
# RUN_FLAGS may be typed with a new value; any other flag typed with a value other than the run's is refused.
LOCAL_FLAGS = {
    "device",
    "cuda",
    "n_cpu",
    "output_dir",
    "resume",
    "eager",
    "display_server",
    "display_port",
    "display_env",
    "fid_weights",
}


RUN_FLAGS = {
    "epoch",
    "n_epochs",
    "decay_epoch",
    "dataroot",
    "save_freq",
    "deterministic",
    "display_freq",
    "no_visdom",
    "n_samples",
    "eval_freq",
    "keep_best",
    "no_figures",
    "mask_dir",
}


ARCH_FLAGS = {"input_nc", "output_nc", "n_blocks", "d_scales", "attention"}


def resume_path(args):
    """The checkpoint --resume names: OUTPUT_DIR/checkpoint.pth, or PATH."""
    return Path(args.output_dir) / "checkpoint.pth" if args.resume in (None, "latest") else Path(args.resume)


def typed_flags(parser, argv=None):
    """The flags (their dests) that a command line gives, whatever their values: a parse with every default removed.
    parser: a fresh one (its defaults are changed)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def load_checkpoint(args, typed, parser, types):
    """The checkpoint to resume from (or None), with args merged: a flag typed on this command line (typed: their
    dests) keeps its value where a resume may change it (RUN_FLAGS, LOCAL_FLAGS) and is refused, by name, where it
    differs from the run's; every other flag takes the run's saved value. parser: the script's; types: what a
    checkpoint must hold (key -> type)."""
    path = resume_path(args)
    if args.resume is None:
        for existing in (path, path.with_name("netG_A2B.pth")):
            if existing.exists():
                raise UserError(
                    f"{existing} holds a run already: continue it with --resume, or pick another --output_dir"
                )
        return None
    if not path.is_file():
        raise UserError(
            f"no checkpoint at {path} to resume from"
            + (" (pass --output_dir of the run, or --resume PATH)" if args.resume == "latest" else "")
        )
    try:
        ckpt = load_weights(path)
    except ValueError as e:
        raise UserError(f"{e}; --resume takes a checkpoint.pth written by train.py") from None
    wrong = checkpoint_problem(ckpt, types, parser)
    if wrong:
        raise UserError(f"{path} is not a checkpoint of train.py: {wrong}")
    saved = ckpt["args"]
    if isinstance(saved.get("lambda_floor"), float):  # weight of mean(1 - map) until 2026-12-07: the same gradient
        saved["lambda_sparsity"] = -saved.pop("lambda_floor")
    changed = {k for k in typed - RUN_FLAGS - LOCAL_FLAGS if k in saved and getattr(args, k) != saved[k]}
    if changed:
        kind = "architecture" if changed & ARCH_FLAGS else "training"
        raise UserError(
            f"{path} was trained with other {kind} flags: "
            + ", ".join(f"--{k} {saved[k]} (given {getattr(args, k)})" for k in sorted(changed))
            + "; drop them to resume, or start a new run in another --output_dir"
        )
    for k in saved.keys() & vars(args).keys() - typed - LOCAL_FLAGS:
        setattr(args, k, saved[k])
    check_device(ckpt, args, path)
    return ckpt


def choose_output_dir(args, typed):
    """Where a run writes. --resume PATH continues in PATH's own folder, unless --output_dir is typed: then it
    branches there, into a folder that holds no other run (refused in one line otherwise, before anything is
    written)."""
    if args.resume in (None, "latest"):
        return
    path = Path(args.resume)
    if "output_dir" not in typed:
        args.output_dir = str(path.parent)
    other = another_run(Path(args.output_dir), path)
    if other is not None:
        raise UserError(
            f"--output_dir {args.output_dir} holds another run ({other.name}): resume {path} in its own folder "
            f"(drop --output_dir), or branch it into an empty or new --output_dir"
        )


def another_run(out, path):
    """A file of OUTPUT_DIR that belongs to a run other than checkpoint `path`'s (its checkpoint, or the seed's
    net*.pth), or None: a resume continues in PATH's own folder, or branches into one that holds no run."""
    if not out.is_dir() or out.resolve() == path.parent.resolve():
        return None
    found = [out / "checkpoint.pth", *sorted(out.glob("net*.pth"))]
    return next((f for f in found if f.exists()), None)


def check_device(ckpt, args, path):
    """A run trained on a GPU, resumed with no --device or --cuda: refused where that kind of GPU is here (the user
    forgot the flag), one line and the CPU where it is not. A checkpoint never chooses the device itself."""
    saved = ckpt.get("device", "cpu")
    if saved == "cpu" or args.device or args.cuda:
        return
    here = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(saved, False)
    if here:
        raise UserError(
            f"{path} was trained on {saved}: pass --device {saved} to continue there, or --device cpu to continue "
            f"on the CPU"
        )
    print(f"{path} was trained on {saved}, which this machine does not have: continuing on the CPU", file=sys.stderr)


def checkpoint_problem(ckpt, types, parser):
    """What is wrong with a loaded checkpoint's layout (a missing key, a value of the wrong type), or None."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a dict"
    for key, kind in types.items():
        if key not in ckpt:
            return f"it has no {key!r}"
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            return f"its {key!r} is a {type(ckpt[key]).__name__}"
    kinds = {a.dest: a.type or type(a.const) for a in parser._actions if a.dest != "help"}
    for key, value in ckpt["args"].items():
        kind = kinds.get(key)
        if kind and value is not None and type(value) is not kind and not (kind is float and type(value) is int):
            return f"its flag {key} is {value!r}, not a {kind.__name__}"
    return None


def resume_command(args):
    """The command that continues this run: the launcher, and the local flags a checkpoint does not carry."""
    world_size, per_node = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    launcher = (
        "python train.py"
        if world_size == 1
        else f"torchrun --nproc_per_node={world_size} train.py"
        if per_node == world_size
        else "torchrun <the same launch flags> train.py"
    )
    device = f" --device {args.device}" if args.device else " --cuda" if args.cuda else ""
    fid_weights = f" --fid_weights {shlex.quote(args.fid_weights)}" if args.fid_weights else ""
    return f"{launcher} --resume --output_dir {shlex.quote(args.output_dir)}{device}{fid_weights}"


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
        raise UserError(
            f"{out} is in use by a running train.py ({holder}): wait for it, stop it, or pick another --output_dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f
