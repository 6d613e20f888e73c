"""What each epoch end leaves on disk besides the checkpoint, in one order that a resumed run finishes: the seed's
net*.pth, the sheet of fixed test images, the FID/KID row, the best generators, the figures and training.html."""

import json
import sys
from pathlib import Path

import torch

from checkpoints import cpu_state, try_save
from datasets import test_images
from figures import BEST, Background, best_row, kept_epoch
from files import write_atomic, write_png
from models import attend
from report import labelled_grid
from runtime import amp_dtype, free_pixels
from utils import UserError, first_line, tensor2image


@torch.inference_mode()
def sample_sheet(G_A2B, G_B2A, samples, device, memory_format, autocast):
    """The fixed test images through both generators, as one labelled (3, H, W) uint8 picture: a row per image
    (A1, A2, ..., B1, ...), columns real / translated / reconstructed, and identity (G_B2A(real_A) for an A image)
    where both domains have the same number of channels, then attention generators' maps of the translation
    (white: translated). samples: {"A": [(C, s, s)], "B": [...]} in [-1, 1]."""
    rows, labels = [], []
    for domain, G, G_back in (("A", G_A2B, G_B2A), ("B", G_B2A, G_A2B)):
        if not samples[domain]:
            continue
        real = torch.stack(samples[domain]).to(device, memory_format=memory_format)
        with autocast:
            fake, attention = attend(G, real)
            results = [real, fake, G_back(fake)]
            if real.shape[1] == fake.shape[1]:
                results.append(G_back(real))  # identity
            if attention is not None:
                results.append(attention * 2 - 1)  # [0, 1] shown black to white
        rows += [[tensor2image(r[i]) for r in results] for i in range(len(real))]
        labels += [f"{domain}{i + 1}" for i in range(len(real))]
    return labelled_grid(rows, labels, ["real", "translated", "reconstructed", "identity", "attention"][: len(rows[0])])


def free_name(path):
    """path, or path with -2, -3, ... before its suffix: the first name no file has."""
    k, found = 1, path
    while found.exists():
        k += 1
        found = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return found


class EpochEnd:
    """Rank 0's files of an epoch end, made by the steps of STEPS in that order. Each is a function of the epoch's
    weights (which the checkpoint, written just before, holds) and of files already on disk, and writes only what is
    missing or stale: after a kill anywhere, the resumed run calls it again for that epoch and ends with the files an
    uninterrupted run leaves, also when it finds every epoch done."""

    STEPS = ("generators", "sheet", "evaluation", "best", "figures")

    def __init__(self, args, resumed_epoch=None, device=torch.device("cpu"), reruns_end=False):
        """resumed_epoch: the epochs a resumed run had done (None: a new run); reruns_end: it stopped at that epoch's
        end, which it now finishes."""
        self.args, self.out = args, Path(args.output_dir)
        self.samples = {
            d: test_images(args.dataroot, d, nc, args.n_samples, args.size)[0]
            for d, nc in (("A", args.input_nc), ("B", args.output_nc))
        }
        self.tracker = None
        if args.eval_freq:
            from metrics import Tracker  # here: importing torch-fidelity takes a second, and only --eval_freq needs it

            try:
                self.tracker = Tracker(
                    self.out,
                    args.dataroot,
                    args.input_nc,
                    args.output_nc,
                    resumed_epoch,
                    device,
                    args.fid_weights,
                    free_pixels(device),
                )
            except ValueError as e:
                raise UserError(e) from None
        self.background = None if args.no_figures else Background()
        self.sheet_shown = None
        if resumed_epoch is not None:
            self.stale_sheets(resumed_epoch)
        if self.tracker:
            self.stale_best(resumed_epoch if reruns_end else None)

    def __call__(self, run, logger):
        """The files of the epoch run has just finished (run.epoch epochs done)."""
        for step in self.STEPS:
            getattr(self, step)(run)
        logger.show(run.epoch, self.sheet_shown, self.tracker.rows if self.tracker else None)

    def generators(self, run):
        """The seed's four files, loadable by its code and by test.py (rewritten: a kill may have cut them short)."""
        for name, net in run.nets.items():
            try_save(cpu_state(net), self.out / f"net{name}.pth")

    def sheet(self, run):
        """samples/epoch_NNN.png, unless a killed run wrote it already (written atomically: there means whole)."""
        path, self.sheet_shown = self.out / "samples" / f"epoch_{run.epoch:03d}.png", None
        if not any(self.samples.values()) or path.is_file():
            return
        # A preview, not a result: in bfloat16 wherever it is native (half the time of float32 on such CPUs; at 8
        # steps an epoch the sheet's 24 generator passes cost as much as a step), else in the run's precision.
        dtype = amp_dtype(run.device)
        autocast = torch.autocast(run.device.type, dtype, cache_enabled=False) if dtype else run.autocast
        self.sheet_shown = sample_sheet(
            run.nets["G_A2B"], run.nets["G_B2A"], self.samples, run.device, run.memory_format, autocast
        )
        try:
            path.parent.mkdir(exist_ok=True)
            write_png(self.sheet_shown, path)
        except OSError as e:
            print(f"warning: could not write the sample sheet of epoch {run.epoch} ({e})", file=sys.stderr)

    def evaluation(self, run):
        """FID and KID of this epoch's generators into metrics.csv, when due and not there yet. Whatever stops it
        (no weights, memory, a full disk) costs one line, and the run trains on without FID from here."""
        if not (self.tracker and self.tracker.due(run.epoch, self.args.eval_freq, self.args.n_epochs)):
            return
        try:
            row = self.tracker.evaluate(
                run.nets["G_A2B"], run.nets["G_B2A"], run.epoch, run.step, run.seconds, run.device
            )
        except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: out of memory, on the GPU or the CPU
            memory = isinstance(e, RuntimeError) and "memory" in str(e)
            why = (
                (
                    "out of memory translating the test images at full size; after training, "
                    "python test.py --metrics --max_size N measures them scaled"
                )
                if memory
                else first_line(e)
            )
            print(f"warning: no FID/KID from here on: {why}", file=sys.stderr)
            self.tracker = None
            return
        best = " (best)" if best_row(self.tracker.rows) is row else ""
        print(f"epoch {run.epoch}: FID A2B {row['fid_A2B']:.2f}, B2A {row['fid_B2A']:.2f}{best}")

    def best(self, run):
        """--keep_best: best_netG_*.pth hold the generators of metrics.csv's lowest FID A2B + B2A, and best_netG.json
        says which epoch that is; written when that is this epoch and the files do not say so yet."""
        row = best_row(self.tracker.rows) if self.tracker and self.args.keep_best else None
        if row is None or row["epoch"] != run.epoch or kept_epoch(self.out) == run.epoch:
            return
        (self.out / BEST).unlink(missing_ok=True)  # while the pair is written, no file says which epoch it holds
        if all(try_save(cpu_state(run.nets[name]), self.out / f"best_net{name}.pth") for name in ("G_A2B", "G_B2A")):
            about = {"epoch": run.epoch, "step": row["step"], "fid_A2B": row["fid_A2B"], "fid_B2A": row["fid_B2A"]}
            try:
                write_atomic(self.out / BEST, lambda f: json.dump(about, f), "w")
            except OSError as e:
                print(f"warning: could not write {BEST} ({e})", file=sys.stderr)

    def figures(self, run):
        """plots/ and training.html, redrawn in the background."""
        if self.background:
            self.background.submit(self.out, self.args.decay_epoch)

    def stale_sheets(self, resumed_epoch):
        """At a resume: the sample sheets of later epochs than the checkpoint's show weights this run trains again
        (on a GPU, not bit for bit): removed, and drawn anew as it reaches them, as their CSV rows are."""
        for path in sorted((self.out / "samples").glob("epoch_*.png")):
            number = path.stem.removeprefix("epoch_")
            if number.isdigit() and int(number) > resumed_epoch:
                path.unlink(missing_ok=True)

    def stale_best(self, rerun_epoch):
        """At a resume: best_netG_*.pth of an epoch whose row is gone (dropped, to be trained again) are moved aside
        as best_netG_*.epochNNN.pth (a free name), never deleted; the lowest row's generators, if not kept and not
        kept by the rerun of its epoch's end (rerun_epoch), are said to be gone."""
        kept, rows = kept_epoch(self.out), self.tracker.rows
        if kept is not None and all(r["epoch"] != kept for r in rows):
            moved = []
            for name in ("G_A2B", "G_B2A", ".json"):
                path = self.out / (BEST if name == ".json" else f"best_net{name}.pth")
                if path.exists():
                    moved.append(free_name(path.with_name(f"{path.stem}.epoch{kept:03d}{path.suffix}")))
                    path.rename(moved[-1])
            names = ", ".join(path.name for path in moved)
            print(
                f"best_netG_*.pth of epoch {kept}, which this run trains again, moved aside as {names}", file=sys.stderr
            )
        row = best_row(rows)
        if (
            self.args.keep_best
            and row is not None
            and kept_epoch(self.out) != row["epoch"]
            and row["epoch"] != rerun_epoch
        ):
            print(
                f"--keep_best: the lowest FID so far is epoch {row['epoch']:g}'s, whose generators were not kept; "
                f"best_netG_*.pth will hold a later epoch only if it does better",
                file=sys.stderr,
            )

    def close(self, timeout=60):
        """Draw the figures once more (a stopped run's too) and wait for them, `timeout` seconds at most."""
        if self.background:
            self.background.submit(self.out, self.args.decay_epoch)
            self.background.close(timeout)
