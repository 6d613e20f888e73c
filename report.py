"""What a person watches during a run: losses.csv, the progress line, and visdom plots that can never stall training."""

import functools
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import requests
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from datasets import new_bad_files
from figures import epoch_means
from files import append_row, keep_rows
from utils import tensor2image

SAMPLE_ROWS = {"A": ["real_A", "fake_B", "rec_A"], "B": ["real_B", "fake_A", "rec_B"]}  # one row per domain
SAMPLE_COLUMNS = ["real", "fake", "reconstructed"]


def sample_grid(images, min_cell=128, pad=4):
    """The six (3, h, w) uint8 samples as one labelled (3, H, W) picture: rows A and B, columns real / fake / rec."""
    return labelled_grid(
        [[images[n] for n in names] for names in SAMPLE_ROWS.values()], list(SAMPLE_ROWS), SAMPLE_COLUMNS, min_cell, pad
    )


def labelled_grid(cells, row_labels, column_labels, min_cell=128, pad=4):
    """Rows of (3, h, w) uint8 pictures, all of one size, as one (3, H, W) picture with its rows and columns named."""
    h, w = cells[0][0].shape[1:]
    scale = -(-min_cell // min(h, w))  # a 32 px crop is narrower than its label: enlarge, pixels kept sharp
    h, w = h * scale, w * scale
    font = ImageFont.load_default(size=max(14, w // 12))
    text_h = font.getbbox("Ag")[3]
    top, left = 2 * text_h, max(2 * text_h, *(int(font.getlength(label)) + text_h for label in row_labels))
    canvas = Image.new("RGB", (left + pad + len(cells[0]) * (w + pad), top + pad + len(cells) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            picture = Image.fromarray(np.ascontiguousarray(cell.transpose(1, 2, 0)))
            canvas.paste(picture.resize((w, h), Image.NEAREST), (left + pad + j * (w + pad), top + pad + i * (h + pad)))
    for j, label in enumerate(column_labels):
        cx = left + pad + j * (w + pad) + w / 2
        draw.text((cx - draw.textlength(label, font) / 2, (top - text_h) / 2), label, "black", font)
    for i, label in enumerate(row_labels):
        cy = top + pad + i * (h + pad) + h / 2
        draw.text(((left - draw.textlength(label, font)) / 2, cy - text_h / 2), label, "black", font)
    return np.asarray(canvas).transpose(2, 0, 1)


class MapProbe:
    """train.py --mask_dir: G_A2B's attention map of fixed test/A images, its mean on the objects their masks keep
    and elsewhere, measured at each row of losses.csv (map_B_object, map_B_rest): a map that learns to keep the
    object shows as the first falling while the second stays near 1; one that collapses, as both near 0 (it copies
    its input) or both near 1 (it translates everything)."""

    names = ["map_B_object", "map_B_rest"]

    def __init__(self, G_A2B, images, masks):
        """images: (N, C, s, s) on G_A2B's device in [-1, 1]; masks: (N, 1, s, s) bool, True on the object."""
        self.G_A2B, self.images, self.masks = G_A2B, images, masks

    @torch.inference_mode()
    def __call__(self):
        a = self.G_A2B.map(self.images).float()
        return {"map_B_object": a[self.masks].mean().item(), "map_B_rest": a[~self.masks].mean().item()}


class Logger:
    """Keeps each step's losses on the device and, once per display interval, averages them (one sync), appends a
    row to losses.csv, updates the progress bar (or prints a line when stderr is not a terminal) and hands the
    history to the visdom plotter. A non-finite loss raises FloatingPointError naming the loss and the step.

    output_dir None: a quiet logger (DDP ranks other than 0) that still averages and checks. average: a function
    that averages a (steps, losses) tensor over processes (DDP), applied before anything else. probe: a MapProbe,
    whose columns each row also gets."""

    def __init__(
        self,
        output_dir,
        names,
        batch_size,
        total_steps,
        step=0,
        seconds=0.0,
        plotter=None,
        window=100,
        average=None,
        probe=None,
    ):
        self.path = output_dir and Path(output_dir) / "losses.csv"
        self.names, self.batch_size, self.total_steps, self.plotter = names, batch_size, total_steps, plotter
        self.probe = probe  # columns measured at each flush rather than averaged over its steps (MapProbe)
        self.columns = ["step", "epoch", *names, *(probe.names if probe else []), "lr", "seconds"]
        self.rows = self._read_history(step) if self.path else []
        self.window, self.pending, self.last_step, self.average = window, None, step, average
        self.k = 0  # steps logged in the current interval
        self.t_start, self.t_last = time.time() - seconds, time.time()
        self.tty = sys.stderr.isatty() and self.path is not None
        self.bar, self.seen_bad = None, set()  # files that failed to decode: each named once per run

    def _read_history(self, step):
        """The rows up to `step`: rows a killed run logged after its last checkpoint are redone, so dropped."""
        return keep_rows(self.path, self.columns, "step", step if step > 0 else None)

    def seconds(self):
        """Training time of the whole run, over resumes."""
        return time.time() - self.t_start

    def begin_epoch(self, epoch, n_epochs, done, steps_per_epoch):
        self.bar = tqdm(
            total=steps_per_epoch,
            initial=done,
            desc=f"epoch {epoch + 1}/{n_epochs}",
            unit="step",
            disable=not self.tty,
            dynamic_ncols=True,
            leave=False,
        )

    def step(self, losses):
        """losses: (len(names),) tensor, copied into a device buffer: one kernel, no sync."""
        if self.pending is None or self.k == len(self.pending):
            grown = losses.new_empty((max(self.window, 2 * self.k), len(self.names)), dtype=torch.float32)
            if self.pending is not None:
                grown[: self.k] = self.pending
            self.pending = grown
        self.pending[self.k].copy_(losses.detach())
        self.k += 1
        self.bar.update(1)

    def flush(self, step, epoch, lr, images=None):
        """Close the interval ending at `step` (epoch: fractional epochs done); images: name -> (C, H, W) tensor."""
        if not self.k:
            return
        values = self.pending[: self.k]  # (steps, losses)
        values = (self.average(values) if self.average else values).cpu()
        self.k = 0
        bad = ~torch.isfinite(values)
        if bad.any():
            k, j = bad.nonzero()[0].tolist()
            raise FloatingPointError(f"{self.names[j]} became {values[k, j].item()} at step {self.last_step + k + 1}")
        now = time.time()
        row = {
            "step": step,
            "epoch": epoch,
            **dict(zip(self.names, values.mean(0).tolist())),
            **(self.probe() if self.probe else {}),
            "lr": lr,
            "seconds": round(self.seconds(), 3),
        }
        speed = (step - self.last_step) / max(now - self.t_last, 1e-9)
        self.last_step, self.t_last = step, now
        if not self.path:
            return
        self.rows.append(row)
        append_row(self.path, self.columns, row)
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total_steps - step) / speed))
        stats = {
            "G": f"{row['loss_G']:.3f}",
            "D": f"{row['loss_D']:.3f}",
            "img/s": f"{speed * self.batch_size:.1f}",
            "eta": eta,
        }
        if self.tty:
            self.bar.set_postfix(stats, refresh=False)
        else:
            print(f"epoch {epoch:.3f} step {step} " + " ".join(f"{k} {v}" for k, v in stats.items()), flush=True)
        if self.plotter:  # images are copied off the device only when someone will see them
            self.plotter.submit(self.rows, images and {k: tensor2image(v) for k, v in images.items()})

    def report_bad(self, bad):
        """Name each file of a batch's "bad" lines that failed to decode, the first time (workers cannot know what
        others saw); every rank reports its own."""
        for line in new_bad_files(bad, self.seen_bad):
            print(f"{line}; replaced by another image", file=sys.stderr)

    def end_epoch(self):
        self.bar.close()

    def show(self, epoch, sheet=None, metrics=None):
        """An epoch end's sheet of fixed test images, and metrics.csv's rows, to visdom (if plotting)."""
        if self.plotter:
            self.plotter.show(epoch, sheet, metrics)

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
        self.sheet = self.metrics = self.sent_sheet = None  # the epoch's fixed-sample sheet; metrics.csv's rows
        self.sent_metrics = 0
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

    def show(self, epoch, sheet=None, metrics=None):
        """At an epoch end: its sheet of the fixed test images (3, H, W), and metrics.csv's rows so far."""
        with self.lock:
            self.sheet = (epoch, sheet) if sheet is not None else self.sheet
            self.metrics = list(metrics) if metrics is not None else self.metrics
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
                    tqdm.write(
                        f"visdom: {self.server}:{self.port} answers now; sent the whole history to env '{self.env}'"
                    )
                self.up = True
            except Exception as e:
                if self.up is not False and self.verbose:
                    tqdm.write(
                        f"visdom: cannot reach {self.server}:{self.port} ({type(e).__name__}); training goes on, "
                        f"and the plots catch up once the server answers (python -m visdom.server)"
                    )
                self.up = False
            if closing:
                return

    def _connect(self):
        from visdom import Visdom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vis = Visdom(
                self.server, port=self.port, env=self.env, send=False, use_incoming_socket=False, raise_exceptions=True
            )
        session = requests.Session()
        # The client sets no timeout: one dropped connection would hang its thread for good.
        session.request = functools.partial(session.request, timeout=self.timeout)
        vis._session, vis.send = session, True
        return vis

    def _update(self):
        self.vis = self.vis or self._connect()
        with self.lock:
            rows, images = self.rows[: self.n_rows], self.images
        if self.env not in self.vis.get_env_list() or not self.vis.win_exists(self.MARKER, env=self.env):
            self.sent = self.sent_epochs = self.sent_metrics = 0
            self.sent_sheet = None
        if self.sent == 0 and rows:
            self.vis.text(f"CycleGAN run: {self.env}", win=self.MARKER, env=self.env)
        new = rows[self.sent :]
        epochs = epoch_means(rows, self.names + ["lr"])
        for name in self.names + ["lr"]:
            if new:
                opts = dict(title=name, xlabel="epoch", showlegend=True)
                if name == "lr":  # plotly centres a constant line in [lr - 1, lr + 1], where its tick reads 0
                    top = 1.1 * max(r["lr"] for r in rows) or 1.0  # the schedule never raises lr: set once per window
                    opts["layoutopts"] = {"plotly": {"yaxis": {"range": [0, top], "tickformat": "~g"}}}  # 0.0002
                self.vis.line(
                    X=np.array([r["epoch"] for r in new]),
                    Y=np.array([r[name] for r in new]),
                    win=name,
                    env=self.env,
                    name="interval mean",
                    update="append" if self.sent else None,
                    opts=opts,
                )
            if len(epochs) > self.sent_epochs and name != "lr":
                done = epochs[self.sent_epochs :]
                self.vis.line(
                    X=np.array([e for e, _ in done]),
                    Y=np.array([m[name] for _, m in done]),
                    win=name,
                    env=self.env,
                    name="epoch mean",
                    update="append",
                )
        self.sent, self.sent_epochs = len(rows), len(epochs)
        if images and rows:
            grid = sample_grid(images)  # built here, not in the training thread
            self._show(
                grid,
                "batch",
                f"training batch at step {rows[-1]['step']} (epoch {rows[-1]['epoch']:.2f})",
                "row A: real_A, fake_B = G_A2B(real_A), rec_A = G_B2A(fake_B); row B: the same from B",
            )
        self._update_epoch()

    def _show(self, grid, win, title, caption):
        """A (3, H, W) picture in its visdom window, with room for the window's margins."""
        opts = dict(title=title, caption=caption, width=grid.shape[2] + 20, height=grid.shape[1] + 60)
        self.vis.image(grid, win=win, env=self.env, opts=opts)

    def _update_epoch(self):
        """The fixed-sample sheet and the FID/KID curves, when they changed or the server is new."""
        with self.lock:
            sheet, metrics = self.sheet, self.metrics or []
        if sheet is not None and sheet is not self.sent_sheet:
            epoch, grid = sheet
            self._show(grid, "samples", f"test images after epoch {epoch}", "the same images every epoch (samples/)")
            self.sent_sheet = sheet
        if len(metrics) > self.sent_metrics:
            for name, scale, title in (
                ("fid", 1, "FID"),
                ("kid", 100, "KID ×100"),
            ):  # as figures.py and papers show KID
                Y = scale * np.array([[r[f"{name}_A2B"], r[f"{name}_B2A"]] for r in metrics])
                self.vis.line(
                    X=np.array([[r["epoch"]] * 2 for r in metrics]),
                    Y=Y,
                    win=name,
                    env=self.env,
                    opts=dict(
                        title=title,
                        xlabel="epoch",
                        legend=["A2B", "B2A"],
                        markers=True,
                    ),
                )
            self.sent_metrics = len(metrics)


def ddp_mean(x, world_size):
    """x summed over torchrun's processes (in place), divided by their number."""
    dist.all_reduce(x)
    return x / world_size


def run_logger(args, world, names, total_steps, run, probe=None):
    """train.py's logger: losses.csv, progress lines and visdom on rank 0; the losses shown are means over all ranks.
    probe: a MapProbe (train.py builds it on rank 0 only)."""
    out = Path(args.output_dir)
    env = args.display_env or f"{Path(args.dataroot.rstrip('/')).name}_{out.resolve().name}"
    plotter = (
        None
        if args.no_visdom or not world.is_main
        else VisdomPlotter(args.display_server, args.display_port, env, names + (probe.names if probe else []))
    )
    average = functools.partial(ddp_mean, world_size=world.size) if world.ddp else None
    return Logger(
        out if world.is_main else None,
        names,
        args.batchSize * world.size,
        total_steps,
        run.step,
        run.seconds,
        plotter,
        window=args.display_freq,
        average=average,
        probe=probe,
    )
