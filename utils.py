"""Training helpers: replay buffer, LR schedule, checkpoints, seeding, and the loss logger
(losses.csv, progress bar, and visdom plots that can never stall training)."""
import csv
import functools
import os
import pickle
import random
import re
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import requests
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm


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


SAMPLE_ROWS = {"A": ["real_A", "fake_B", "rec_A"], "B": ["real_B", "fake_A", "rec_B"]}  # one row per domain
SAMPLE_COLUMNS = ["real", "fake", "reconstructed"]


def sample_grid(images, min_cell=128, pad=4):
    """The six (3, h, w) uint8 samples as one labelled (3, H, W) picture: rows A and B, columns real / fake / rec."""
    from torchvision.utils import make_grid  # here, in the plotter's thread: importing torchvision takes seconds
    x = torch.stack([torch.from_numpy(images[n]) for names in SAMPLE_ROWS.values() for n in names])  # (6, 3, h, w)
    scale = -(-min_cell // min(x.shape[2:]))  # a 32 px crop is narrower than its label: enlarge, pixels kept sharp
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    h, w = x.shape[2:]
    grid = Image.fromarray(make_grid(x, nrow=3, padding=pad, pad_value=255).permute(1, 2, 0).numpy())
    font = ImageFont.load_default(size=max(14, w // 12))
    text_h = font.getbbox("Ag")[3]
    top, left = 2 * text_h, 2 * text_h
    canvas = Image.new("RGB", (left + grid.width, top + grid.height), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(SAMPLE_COLUMNS):
        cx = left + pad + j * (w + pad) + w / 2
        draw.text((cx - draw.textlength(label, font) / 2, (top - text_h) / 2), label, "black", font)
    for i, label in enumerate(SAMPLE_ROWS):
        cy = top + pad + i * (h + pad) + h / 2
        draw.text(((left - draw.textlength(label, font)) / 2, cy - text_h / 2), label, "black", font)
    return np.asarray(canvas).transpose(2, 0, 1)


class Logger:
    """Keeps each step's losses on the device and, once per display interval, averages them (one sync), appends a
    row to losses.csv, updates the progress bar (or prints a line when stderr is not a terminal) and hands the
    history to the visdom plotter. A non-finite loss raises FloatingPointError naming the loss and the step.

    output_dir None: a quiet logger (DDP ranks other than 0) that still averages and checks. average: a function
    that averages a (steps, losses) tensor over processes (DDP), applied before anything else."""

    def __init__(self, output_dir, names, batch_size, total_steps, step=0, seconds=0.0, plotter=None,
                 window=100, average=None):
        self.path = output_dir and Path(output_dir) / "losses.csv"
        self.names, self.batch_size, self.total_steps, self.plotter = names, batch_size, total_steps, plotter
        self.columns = ["step", "epoch", *names, "lr", "seconds"]
        self.rows = self._read_history(step) if self.path else []
        self.window, self.pending, self.last_step, self.average = window, None, step, average
        self.k = 0  # steps logged in the current interval
        self.t_start, self.t_last = time.time() - seconds, time.time()
        self.tty = sys.stderr.isatty() and self.path is not None
        self.bar = None

    def _read_history(self, step):
        """The rows up to `step`: rows a killed run logged after its last checkpoint are redone, so dropped."""
        rows = []
        if self.path.exists() and step > 0:
            with open(self.path, newline="") as f:
                rows = [{k: int(v) if k == "step" else float(v) for k, v in r.items()}
                        for r in csv.DictReader(f) if int(r["step"]) <= step]
        elif self.path.exists():  # a fresh run: keep the old file under another name
            self.path.rename(self.path.with_name(f"losses.{int(self.path.stat().st_mtime)}.csv"))
        tmp = self.path.with_name("losses.csv.tmp")
        with open_new(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows({k: r.get(k, float("nan")) for k in self.columns} for r in rows)
        os.replace(tmp, self.path)
        return rows

    def seconds(self):
        """Training time of the whole run, over resumes."""
        return time.time() - self.t_start

    def begin_epoch(self, epoch, n_epochs, done, steps_per_epoch):
        self.bar = tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{n_epochs}", unit="step",
                        disable=not self.tty, dynamic_ncols=True, leave=False)

    def step(self, losses):
        """losses: (len(names),) tensor, copied into a device buffer: one kernel, no sync."""
        if self.pending is None or self.k == len(self.pending):
            grown = losses.new_empty((max(self.window, 2 * self.k), len(self.names)), dtype=torch.float32)
            if self.pending is not None:
                grown[:self.k] = self.pending
            self.pending = grown
        self.pending[self.k].copy_(losses.detach())
        self.k += 1
        self.bar.update(1)

    def flush(self, step, epoch, lr, images=None):
        """Close the interval ending at `step` (epoch: fractional epochs done); images: name -> (C, H, W) tensor."""
        if not self.k:
            return
        values = self.pending[:self.k]  # (steps, losses)
        values = (self.average(values) if self.average else values).cpu()
        self.k = 0
        bad = ~torch.isfinite(values)
        if bad.any():
            k, j = bad.nonzero()[0].tolist()
            raise FloatingPointError(f"{self.names[j]} became {values[k, j].item()} at step {self.last_step + k + 1}")
        now = time.time()
        row = {"step": step, "epoch": epoch, **dict(zip(self.names, values.mean(0).tolist())), "lr": lr,
               "seconds": round(self.seconds(), 3)}
        speed = (step - self.last_step) / max(now - self.t_last, 1e-9)
        self.last_step, self.t_last = step, now
        if not self.path:
            return
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total_steps - step) / speed))
        stats = {"G": f"{row['loss_G']:.3f}", "D": f"{row['loss_D']:.3f}", "img/s": f"{speed * self.batch_size:.1f}", "eta": eta}
        if self.tty:
            self.bar.set_postfix(stats, refresh=False)
        else:
            print(f"epoch {epoch:.3f} step {step} " + " ".join(f"{k} {v}" for k, v in stats.items()), flush=True)
        if self.plotter:  # images are copied off the device only when someone will see them
            self.plotter.submit(self.rows, images and {k: tensor2image(v) for k, v in images.items()})

    def end_epoch(self):
        self.bar.close()

    def close(self):
        if self.bar:
            self.bar.close()
        if self.plotter:
            self.plotter.close()


class VisdomPlotter:
    """Plots the loss history and the sample grid in visdom from a background thread.

    The training thread only hands over a reference to the history; every request has a timeout. A server that
    is down, slow or restarted costs one warning line, and as soon as it answers it is sent the whole history."""

    MARKER = "run"  # a small text window: when it is missing the server is new and gets everything again

    def __init__(self, server, port, env, names, timeout=5.0, verbose=True):
        self.server, self.port, self.env, self.names, self.timeout = server, port, env, names, timeout
        self.rows, self.n_rows, self.images = [], 0, None
        self.sent, self.sent_epochs, self.vis, self.up, self.verbose = 0, 0, None, None, verbose
        self.lock, self.wake, self.closing = threading.Lock(), threading.Event(), False
        self.thread = threading.Thread(target=self._run, name="visdom", daemon=True)
        self.thread.start()
        self.wake.set()  # connect now, so a missing server is reported at start

    def submit(self, rows, images=None):
        with self.lock:
            self.rows, self.n_rows = rows, len(rows)  # rows is append-only: rows[:n_rows] is stable
            self.images = images if images is not None else self.images
        self.wake.set()

    def close(self, wait=10.0):
        """Send what is pending, waiting at most `wait` seconds."""
        self.closing = True
        self.wake.set()
        self.thread.join(wait)

    def _run(self):
        while True:
            self.wake.wait()
            self.wake.clear()
            closing = self.closing
            try:
                self._update()
                if self.up is False and self.verbose:
                    tqdm.write(f"visdom: {self.server}:{self.port} answers now; sent the whole history to env '{self.env}'")
                self.up = True
            except Exception as e:
                if self.up is not False and self.verbose:
                    tqdm.write(f"visdom: cannot reach {self.server}:{self.port} ({type(e).__name__}); training goes on, "
                               f"and the plots catch up once the server answers (python -m visdom.server)")
                self.up = False
            if closing:
                return

    def _connect(self):
        from visdom import Visdom
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vis = Visdom(self.server, port=self.port, env=self.env, send=False, use_incoming_socket=False,
                         raise_exceptions=True)
        session = requests.Session()
        # The client sets no timeout: one dropped connection would hang its thread for good.
        session.request = functools.partial(session.request, timeout=self.timeout)
        vis._session, vis.send = session, True
        return vis

    def _update(self):
        self.vis = self.vis or self._connect()
        with self.lock:
            rows, images = self.rows[:self.n_rows], self.images
        if self.env not in self.vis.get_env_list() or not self.vis.win_exists(self.MARKER, env=self.env):
            self.sent = self.sent_epochs = 0
        if self.sent == 0 and rows:
            self.vis.text(f"CycleGAN run: {self.env}", win=self.MARKER, env=self.env)
        new = rows[self.sent:]
        epochs = epoch_means(rows, self.names + ["lr"])
        for name in self.names + ["lr"]:
            if new:
                opts = dict(title=name, xlabel="epoch", showlegend=True)
                if name == "lr":  # plotly centres a constant line in [lr - 1, lr + 1], where its tick reads 0
                    top = 1.1 * max(r["lr"] for r in rows) or 1.0  # the schedule never raises lr: set once per window
                    opts["layoutopts"] = {"plotly": {"yaxis": {"range": [0, top], "tickformat": "~g"}}}  # 0.0002
                self.vis.line(X=np.array([r["epoch"] for r in new]), Y=np.array([r[name] for r in new]), win=name,
                              env=self.env, name="interval mean", update="append" if self.sent else None, opts=opts)
            if len(epochs) > self.sent_epochs and name != "lr":
                done = epochs[self.sent_epochs:]
                self.vis.line(X=np.array([e for e, _ in done]), Y=np.array([m[name] for _, m in done]), win=name,
                              env=self.env, name="epoch mean", update="append")
        self.sent, self.sent_epochs = len(rows), len(epochs)
        if images and rows:
            grid = sample_grid(images)  # built here, not in the training thread
            self.vis.image(grid, win="samples", env=self.env, opts=dict(
                title=f"samples at step {rows[-1]['step']} (epoch {rows[-1]['epoch']:.2f})",
                caption="row A: real_A, fake_B = G_A2B(real_A), rec_A = G_B2A(fake_B); row B: the same from B",
                width=grid.shape[2] + 20, height=grid.shape[1] + 60))


def epoch_means(rows, names):
    """[(epoch number, {name: mean over its steps})] for every finished epoch in the history rows."""
    means, start, prev_step = [], 0, 0
    for i, r in enumerate(rows):
        if r["epoch"] == int(r["epoch"]) and r["epoch"] > 0:  # the row that closes an epoch
            chunk = rows[start:i + 1]
            steps = np.diff([prev_step] + [c["step"] for c in chunk])
            means.append((r["epoch"], {n: float(np.average([c[n] for c in chunk], weights=steps)) for n in names}))
            start, prev_step = i + 1, r["step"]
    return means
