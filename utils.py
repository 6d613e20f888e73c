"""Training machinery: replay buffer, LR schedule, seeding, safe files and checkpoints, the CUDA-graph step, stopping."""
import contextlib
import errno
import multiprocessing
import os
import pickle
import random
import re
import signal
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

try:
    import fcntl  # one run per output folder (POSIX; elsewhere not enforced)
except ImportError:
    fcntl = None


class ReplayBuffer:
    """The last max_size fakes (Shrivastava et al. 2017): half the time D sees an older fake instead of the new one.

    The fakes live in one preallocated float32 tensor on their device, and the random choices are drawn on the CPU
    before the step (`draw`), so the step itself is fixed tensor work that a CUDA graph can replay."""

    KEEP, STORE, SWAP = 0, 1, 2  # D sees the new fake | the new fake is stored and seen | D sees an old one, replaced

    def __init__(self, max_size=50, seed=0):
        self.max_size, self.n, self.data = max_size, 0, None  # n: slots filled so far
        self.generator = torch.Generator().manual_seed(seed)  # own stream, saved in checkpoints

    def draw(self, batch_size):
        """This batch's choices, (batch_size, 2) int64 rows of (slot, action), consuming the random stream."""
        rows = []
        for _ in range(batch_size):
            if self.n < self.max_size:
                rows.append((self.n, self.STORE))
                self.n += 1
            elif self.max_size and torch.rand(1, generator=self.generator).item() > 0.5:
                rows.append((torch.randint(self.max_size, (1,), generator=self.generator).item(), self.SWAP))
            else:
                rows.append((0, self.KEEP))
        return torch.tensor(rows, dtype=torch.int64).reshape(batch_size, 2)

    def push_and_pop(self, fakes, choices):
        """What D sees for fakes (B, C, H, W), given draw()'s choices (on the fakes' device); stores fakes as chosen."""
        if self.max_size == 0:
            return fakes.detach()
        layout = memory_format_of(fakes)  # D reads what comes out in the networks' layout (channels_last on CUDA)
        if self.data is None:  # rows are written before they are read; untouched pages cost no memory
            self.data = torch.empty((self.max_size, *fakes.shape[1:]), dtype=torch.float32, device=fakes.device,
                                    memory_format=layout)
        seen = []
        for k in range(len(fakes)):  # in order: two fakes of a batch may pick the same slot
            slot, action = choices[k, :1], choices[k, 1]
            old, new = self.data.index_select(0, slot), fakes[k:k + 1].detach().float()  # (1, C, H, W) each
            seen.append(torch.where(action == self.SWAP, old, new))
            self.data.index_copy_(0, slot, torch.where(action == self.KEEP, old, new))
        return torch.cat(seen).contiguous(memory_format=layout)  # a no-op unless index_select changed the layout

    def state_dict(self):
        rows = [self.data[i:i + 1].to("cpu", memory_format=torch.contiguous_format) for i in range(self.n)]
        return {"data": rows, "generator": self.generator.get_state()}

    def load_state_dict(self, state, device, memory_format=torch.contiguous_format):
        self.n, self.data = len(state["data"]), None
        if state["data"]:
            self.data = torch.empty((self.max_size, *state["data"][0].shape[1:]), device=device,
                                    memory_format=memory_format)
            self.data[:self.n] = torch.cat(state["data"]).to(device)
        self.generator.set_state(state["generator"])


def memory_format_of(x):
    """channels_last if the 4-D tensor x is laid out so (and not also plain contiguous), else contiguous_format."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def linear_decay(n_epochs, decay_epoch):
    """LR factor of the paper: 1 until decay_epoch, then linearly down to 0 at n_epochs."""
    return lambda epoch: 1.0 - max(0, epoch - decay_epoch) / (n_epochs - decay_epoch)


def amp_dtype(device):
    """The autocast type of mixed precision (--amp): bfloat16 where the device computes it natively, float16 (with loss scaling) on
    GPUs without bfloat16, None on CPUs without bfloat16 units (there it is many times slower than float32)."""
    if device.type == "cuda":  # by default is_bf16_supported also counts bfloat16 emulated on pre-Ampere GPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None  # AVX512-BF16 or AMX


def precision(device):
    """(memory layout, autocast) of the translation: off the CPU channels_last (cuDNN's fast layout, for G and its
    inputs alike) and on the GPU bf16 (fp16 without it); on the CPU contiguous fp32, so results are exact."""
    layout = torch.channels_last if device.type != "cpu" else torch.contiguous_format
    return layout, torch.autocast("cuda", amp_dtype(device)) if device.type == "cuda" else contextlib.nullcontext()


def set_requires_grad(nets, flag):
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def unwrap(model):
    """The plain module under DDP / torch.compile wrappers, so saved keys carry no module. / _orig_mod. prefix."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def first_line(e):
    """The first line of an exception's message (its type's name if it has none), for one-line reports."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def cannot_write(folder, e):
    """The one line for an output folder that cannot be made or written (e: the OSError)."""
    return f"cannot write to --output_dir {folder} ({e.strerror or first_line(e)}): pick a folder you can write to"


def channels_problem(args):
    """Why --input_nc / --output_nc cannot work (images are read as gray or RGB only), or None."""
    for flag in ("input_nc", "output_nc"):
        if getattr(args, flag) not in (1, 3):
            return f"--{flag} {getattr(args, flag)}: images are read as gray (1) or RGB (3)"
    return None


def shown(path):
    """A path as text that prints anywhere: bytes of a name that are not UTF-8 become U+FFFD."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def load_weights(path):
    """torch.load onto the CPU of tensors and plain containers only (weights_only). FileNotFoundError if path does not
    exist; ValueError, in one line, if it is empty, not a PyTorch file, or holds other Python objects, which are
    refused unread (unpickling them could run any code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:  # torch's message is a page of advice; the line that matters is in it
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))  # "Unsupported global: GLOBAL x.y" or "... GLOBAL x.y whose ..."
        if not refused:  # no pickle of ours at all: text, an image, a truncated file
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise ValueError(f"{shown(path)} is not a PyTorch weights file "
                             f"({why[1] if why else first_line(e)[:200]})") from None
        raise ValueError(f"{shown(path)} holds pickled Python objects besides tensors ({refused[1]}), refused "
                         f"unread because loading them could run code: it was not saved by this repository") from None
    except Exception as e:
        why = "the file is empty" if Path(path).is_file() and Path(path).stat().st_size == 0 else \
            f"{type(e).__name__}: {first_line(e)[:200]}"
        raise ValueError(f"{shown(path)} is not a PyTorch weights file ({why})") from None


def open_new(path, mode="wb", **kwargs):
    """Open path as a new file for writing. Whatever file was there, a planted symbolic link included, is removed
    first, never written through, and the file is created exclusively, without following links."""
    path = Path(path)
    try:
        path.unlink()  # a link itself, not its target
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, mode, **kwargs)


def atomic_save(obj, path):
    """torch.save via a temporary file, fsync and os.replace: a crash or a full disk mid-write leaves the old file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open_new(tmp) as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def to_uint8(x):
    """Generator output in [-1, 1] -> uint8, rounded exactly as the seed: 0.5 * (x + 1) written by torchvision's
    save_image, which computes mul(255).add_(0.5).clamp_(0, 255) and truncates."""
    return (0.5 * (x + 1.0)).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def tensor2image(x):
    """(C, H, W) in [-1, 1] -> (3, H, W) uint8 for display."""
    x = to_uint8(x.detach().float().cpu())
    return (x.expand(3, -1, -1) if x.shape[0] == 1 else x).numpy()


def loader_workers(n_cpu, n_items):
    """DataLoader workers worth starting: at most n_cpu, the CPUs this process may run on, and n_items
    (more only cost start-up time, and make PyTorch warn about excessive worker creation)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(n_cpu, cpus, n_items))


# On --resume: flags left at their default take the run's saved value, except LOCAL_FLAGS: where to run, and where
# data goes, come from this command line alone, never from a checkpoint file (which may be someone else's). RUN_FLAGS
# may be given a new value; any other flag given with a new value is refused.
LOCAL_FLAGS = {"cuda", "n_cpu", "output_dir", "resume", "eager", "display_server", "display_port", "display_env",
               "fid_weights"}
RUN_FLAGS = {"epoch", "n_epochs", "decay_epoch", "dataroot", "save_freq", "deterministic", "display_freq", "no_visdom",
             "n_samples", "eval_freq", "keep_best", "no_figures"}
ARCH_FLAGS = {"input_nc", "output_nc", "n_blocks"}


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback."""


def adam(params, lr, device, lr_tensor):
    """The paper's Adam, fused into one kernel. lr_tensor: the lr is a tensor on the device that the schedule fills in
    place, so a captured CUDA graph reads every new value (and needs the step counts on the device: capturable)."""
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999), fused=True, capturable=lr_tensor)
    if lr_tensor:  # set after construction: Adam's check of lr >= 0 would read a device tensor back
        optimizer.param_groups[0]["lr"] = torch.tensor(lr, device=device)
    return optimizer


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


def resume_path(args):
    """The checkpoint --resume names: OUTPUT_DIR/checkpoint.pth, or PATH."""
    return Path(args.output_dir) / "checkpoint.pth" if args.resume in (None, "latest") else Path(args.resume)


def load_checkpoint(args, parser, types):
    """The checkpoint to resume from (or None), with args merged: the run's flags unless given anew here. parser: the
    script's; types: what a checkpoint must hold (key -> type)."""
    path = resume_path(args)
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
    wrong = checkpoint_problem(ckpt, types, parser)
    if wrong:
        raise UserError(f"{path} is not a checkpoint of train.py: {wrong}")
    saved = ckpt["args"]
    defaults = vars(parser.parse_args([]))
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
    world_size, per_node = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    launcher = ("python train.py" if world_size == 1 else f"torchrun --nproc_per_node={world_size} train.py"
                if per_node == world_size else "torchrun <the same launch flags> train.py")
    return f"{launcher} --resume --output_dir {args.output_dir}" + " --cuda" * args.cuda
