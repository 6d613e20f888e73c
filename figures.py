"""The files a write-up needs, from what a run left on disk: one SVG per curve and an overview PNG in OUTPUT_DIR/plots/,
and OUTPUT_DIR/training.html with the curves, the FID/KID table and the per-epoch sample grids.

    python figures.py output/horse2zebra                     # redraw from losses.csv: a finished, running or old run
    python figures.py output/horse2zebra --decay_epoch 100   # mark the lr decay here (default: where the lr falls)

During training, Background().submit(OUTPUT_DIR, decay_epoch) runs the same command in a subprocess at each epoch end:
the training thread only starts a process, and a figure that cannot be drawn costs one warning line on stderr.
Exit codes: 0 drawn, 1 an error of the caller (no such folder, no losses.csv), 2 the figures could not be drawn.
"""

import argparse
import contextlib
import gc
import hashlib
import html
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

from files import read_rows, remove_leftovers, shown, write_atomic

try:
    import fcntl  # two redraws of one folder take turns (POSIX; elsewhere not enforced)
except ImportError:
    fcntl = None

# No torch here (a redraw would spend seconds importing it), and matplotlib is imported where it is used: train.py
# imports this module for Background, and the command answers a wrong folder at once.

LOSSES = ["loss_G", "loss_D", "loss_G_cycle", "loss_G_GAN", "loss_G_identity", "loss_D_A", "loss_D_B"]
LOSSES += ["loss_map", "map_A", "map_B", "map_B_object", "map_B_rest", "lr"]  # --attention runs only (--mask_dir)
MEASURED = {"map_B_object", "map_B_rest"}  # taken at each row of losses.csv, not averaged over its steps
DIRECTIONS = ["A2B", "B2A"]
BEST = "best_netG.json"  # which epoch best_netG_*.pth hold (train.py --keep_best)
TITLES = {  # what each curve is, from models.py's objective and train.py's step
    "loss_G": "loss_G = GAN + cycle + identity",
    "loss_D": "loss_D = loss_D_A + loss_D_B",
    "loss_G_cycle": "loss_G_cycle: L1 of A→B→A and B→A→B",
    "loss_G_GAN": "loss_G_GAN: fakes judged real (LSGAN)",
    "loss_G_identity": "loss_G_identity: L1 of G_A2B(B) to B, …",
    "loss_D_A": "loss_D_A: real A → 1, fake A → 0",
    "loss_D_B": "loss_D_B: real B → 1, fake B → 0",
    "loss_map": "loss_map: the maps' GAN, identity, TV and sparsity",
    "map_A": "map_A: mean of G_B2A's map (1 translates)",
    "map_B": "map_B: mean of G_A2B's map (1 translates)",
    "map_B_object": "map_B_object: G_A2B's map on the masks' objects (0 keeps)",
    "map_B_rest": "map_B_rest: G_A2B's map off the masks' objects (1 translates)",
    "lr": "learning rate",
    "fid": "FID against the real test images (lower is better)",
    "kid": "KID ×100 ± std (lower is better)",
}
Y_LABELS = {"fid": "FID", "kid": "KID ×100"}
# Same data, same bytes: ids are hashed with a fixed salt instead of random ones (and savefig gets no Date). No path
# simplification: every logged point is a vertex in the SVG, so a reader (or a test) finds what losses.csv holds.
# Text stays text in the SVGs (svg.fonttype none): glyphs as paths cost a tenth of every redraw, and the files grow.
RC = {
    "svg.hashsalt": "cyclegan-figures",
    "path.simplify": False,
    "font.size": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.fonttype": "none",
}
SVG_SIZE, SVG_RC = (6.4, 4.0), {"font.size": 11, "legend.fontsize": 9}  # 614 x 384 px, often shown at 2/3 of that
OVERVIEW_COLUMNS, OVERVIEW_PANEL, OVERVIEW_DPI = 4, (3.25, 2.6), 150  # 4 panels of 3.25 in: 1950 px wide
PAGE_STYLE = (
    "body{font-family:sans-serif;margin:1em;max-width:1900px}table{border-collapse:collapse}"
    "th,td{padding:4px 8px;text-align:center;border-bottom:1px solid #ddd}tr.best td{font-weight:bold}"
    ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,440px),1fr));gap:1em}"
    "figure{margin:0}figure img{display:block;max-width:100%;height:auto;margin:auto}"
    "figcaption{text-align:center;color:#555;font-size:90%}.note{color:#555}.wide{overflow-x:auto}"
)


def finite(value):
    """Whether value is a float that is neither NaN nor infinite (a missing cell is NaN)."""
    return isinstance(value, float) and math.isfinite(value)


def epoch_means(rows, names):
    """[(epoch number, {name: mean over its steps})] for every finished epoch in the history rows."""
    means, start, prev_step = [], 0, 0
    for i, r in enumerate(rows):
        if r["epoch"] == int(r["epoch"]) and r["epoch"] > 0:  # the row that closes an epoch
            chunk = rows[start : i + 1]
            steps = np.diff([prev_step] + [c["step"] for c in chunk])
            means.append((r["epoch"], {n: float(np.average([c[n] for c in chunk], weights=steps)) for n in names}))
            start, prev_step = i + 1, r["step"]
    return means


def logged_decay(rows):
    """--decay_epoch as the logged lr shows it: a row of epoch e (in (k, k + 1]) was trained at factor lr_lambda(k),
    which first falls below 1 at k = decay_epoch + 1. None while the lr has not fallen."""
    top = max((r["lr"] for r in rows if finite(r.get("lr"))), default=math.nan)
    fallen = [r["epoch"] for r in rows if finite(r.get("lr")) and r["lr"] < top]
    return math.ceil(fallen[0]) - 2 if fallen else None


def run_data(output_dir, decay_epoch=None):
    """What the figures show: loss rows, epoch means, metrics rows, the lr decay epoch, and the curves to draw."""
    out = Path(output_dir)
    rows = [r for r in read_rows(out / "losses.csv") if finite(r.get("step")) and finite(r.get("epoch"))]
    metrics = read_rows(out / "metrics.csv", text=("weights",)) if (out / "metrics.csv").is_file() else []
    metrics = [r for r in metrics if finite(r.get("epoch"))]
    names = [n for n in LOSSES if rows and n in rows[0]]  # a column an older run did not write is left out
    if decay_epoch is None:
        decay_epoch = logged_decay(rows)
    curves = names + [k for k in Y_LABELS if any(finite(m.get(f"{k}_{d}")) for m in metrics for d in DIRECTIONS)]
    return {
        "rows": rows,
        "means": epoch_means(rows, names),
        "metrics": metrics,
        "curves": curves,
        "decay_epoch": decay_epoch if isinstance(decay_epoch, int | float) else None,
    }


def plot_loss(ax, name, data):
    """One column of losses.csv: the interval means (MEASURED: the values at each row) as a thin line, the epoch
    means as markers on a line."""
    rows, means = data["rows"], data["means"]
    ax.plot(
        [r["epoch"] for r in rows],
        [r[name] for r in rows],
        lw=0.8,
        color="C0",
        alpha=0.7,
        label="at each row" if name in MEASURED else "interval mean",
        gid="interval-mean",
    )
    ax.plot(
        [e for e, _ in means],
        [m[name] for _, m in means],
        "o-",
        ms=4,
        lw=1.2,
        color="C1",
        label="epoch mean",
        gid="epoch-mean",
    )


def plot_metric(ax, kind, data):
    """FID, or KID ×100 with its std as error bars, of both directions against the evaluated epochs."""
    for d, color in zip(DIRECTIONS, ("C2", "C3")):  # not C0/C1, the colours of the loss curves' two kinds
        rows = [m for m in data["metrics"] if finite(m.get(f"{kind}_{d}"))]
        x = [m["epoch"] for m in rows]
        if kind == "fid":
            ax.plot(x, [m[f"fid_{d}"] for m in rows], "o-", ms=4, color=color, label=d, gid=f"fid-{d}")
            continue
        std = [100 * m.get(f"kid_std_{d}", math.nan) for m in rows]
        bars = ax.errorbar(
            x,
            [100 * m[f"kid_{d}"] for m in rows],
            yerr=[s if math.isfinite(s) else 0 for s in std],
            fmt="o-",
            ms=4,
            capsize=3,
            color=color,
            label=d,
        )
        bars.lines[0].set_gid(f"kid-{d}")  # the line of the means: what a test counts


def panel(ax, name, data, small=False):
    """One curve on ax with its title, axis names, the lr decay and a legend."""
    (plot_metric if name in Y_LABELS else plot_loss)(ax, name, data)
    epochs = [r["epoch"] for r in data["rows"]] + [m["epoch"] for m in data["metrics"]]
    # --decay_epoch d: LambdaLR's epochs 0..d run at the full rate, so the lr falls from d + 1 epochs done on. Marked
    # once that has happened: a line at epoch 101 of a run at epoch 2 would squash its curves to the left.
    start = data["decay_epoch"] + 1 if data["decay_epoch"] is not None else None
    if start is not None and epochs and start <= max(epochs):
        ax.axvline(start, ls="--", lw=1, color="0.4", label="lr decay", gid="lr-decay")
    ax.set_xlim(left=0)  # FID from epoch 2 on lines up with the losses from 0
    ax.set_title(name if small else TITLES[name], fontsize="medium" if small else "large")
    ax.set_xlabel("epoch")
    ax.set_ylabel(Y_LABELS.get(name, name))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))  # lr: 2 and 1e-4 above the axis, not 0.0002
    if ax.get_legend_handles_labels()[0] and (not small or name in Y_LABELS):  # small losses: the figure's legend
        ax.legend(loc="best")


def save(fig, path, **kwargs):
    """The figure as path (format from its suffix), written atomically, with no date inside."""
    fmt = path.suffix[1:]
    metadata = {"Date": None} if fmt == "svg" else {}
    return write_atomic(path, lambda f: fig.savefig(f, format=fmt, metadata=metadata, **kwargs))


def set_margins(fig, left, bottom, right, top, **spacing):
    """Margins in inches, fixed: a layout engine measures every label, seconds per figure on a small CPU."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, bottom=bottom / h, right=1 - right / w, top=1 - top / h, **spacing)


def drawing_keys(data):
    """A key per file of plots/ that changes when what it shows does: the data of its curve (all of them for the
    overview), the lr decay, and this file's own code, which says how they are drawn."""
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    epochs = [r["epoch"] for r in data["rows"]] + [m["epoch"] for m in data["metrics"]]
    keys = {}
    for name in data["curves"]:
        shown = (
            [[m["epoch"]] + [m.get(f"{k}_{d}") for d in DIRECTIONS for k in (name, "kid_std")] for m in data["metrics"]]
            if name in Y_LABELS
            else [[r["epoch"], r[name]] for r in data["rows"]]
        )
        about = repr((name, shown, data["decay_epoch"], max(epochs, default=None), code))
        keys[f"{name}.svg"] = hashlib.sha256(about.encode()).hexdigest()
    keys["overview.png"] = hashlib.sha256(repr((sorted(keys.items()), data["name"])).encode()).hexdigest()
    return keys


def draw_plots(plots, data):
    """plots/NAME.svg for each curve and plots/overview.png with all of them as small panels, each drawn only if
    what it shows changed since it was drawn (plots/.drawn.json keeps the keys, written after the files); the paths
    drawn. Two redraws of one run (the background one, one typed by hand) take turns: the manifest always describes
    the files beside it."""
    plots.mkdir(exist_ok=True)
    remove_leftovers(plots)
    with locked(plots):
        return draw_missing(plots, data)


@contextlib.contextmanager
def locked(folder):
    """An exclusive lock on the folder itself, held while the block runs (POSIX; elsewhere no lock)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


def draw_missing(plots, data):
    """draw_plots' work, under its lock."""
    keys, manifest = drawing_keys(data), plots / ".drawn.json"
    try:
        drawn = json.loads(manifest.read_text())
    except (OSError, ValueError):
        drawn = {}
    todo = {k for k, v in keys.items() if drawn.get(k) != v or not (plots / k).is_file()}
    if not todo:
        return []
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global figure list, no display backend, Agg for the PNG

    manifest.unlink(missing_ok=True)  # a redraw stopped halfway leaves no key for a file it did not finish
    written, curves = [], data["curves"]
    with matplotlib.rc_context(RC):
        for name in (c for c in curves if f"{c}.svg" in todo):
            with matplotlib.rc_context({**SVG_RC, "svg.id": f"figure-{name}"}):
                fig = Figure(figsize=SVG_SIZE)
                set_margins(fig, 0.8, 0.55, 0.15, 0.4)  # tick labels of up to 6 characters (sci notation past 1e4)
                panel(fig.add_subplot(), name, data)
                written.append(save(fig, plots / f"{name}.svg"))
        if "overview.png" in todo:
            written.append(draw_overview(plots / "overview.png", data))
    write_atomic(manifest, lambda f: json.dump(keys, f), "w")
    return written


def draw_overview(path, data):
    """plots/overview.png: every curve as a small panel, four to a row, one legend for the losses."""
    from matplotlib.figure import Figure

    curves = data["curves"]
    n_rows = -(-len(curves) // OVERVIEW_COLUMNS)
    fig = Figure(figsize=(OVERVIEW_COLUMNS * OVERVIEW_PANEL[0], n_rows * OVERVIEW_PANEL[1]))
    set_margins(fig, 0.6, 0.45, 0.15, 0.7, wspace=0.35, hspace=0.65)
    axes = fig.subplots(n_rows, OVERVIEW_COLUMNS, squeeze=False).ravel()
    for ax, name in zip(axes, curves):
        panel(ax, name, data, small=True)
    for ax in axes[len(curves) :]:
        ax.set_visible(False)
    # One legend for the loss panels: the same entries on each would hide the curves.
    handles = dict(zip(*reversed(axes[0].get_legend_handles_labels())))
    fig.legend(handles.values(), handles.keys(), loc="upper right", ncols=len(handles), frameon=False)
    fig.suptitle(f"{data['name']}: losses and metrics against epochs", x=0.01, ha="left")
    return save(fig, path, dpi=OVERVIEW_DPI)


def number(value, fmt=".2f"):
    """A table cell's text: the number, or a dash for a missing one."""
    return format(value, fmt) if finite(value) else "–"


def fid_sum(row):
    """FID A→B + FID B→A of a metrics row (NaN if either is missing): what "best" means."""
    return row.get("fid_A2B", math.nan) + row.get("fid_B2A", math.nan)


def best_row(rows):
    """The metrics row of the lowest FID A→B + B→A (the first of equals), or None."""
    return min((r for r in rows if math.isfinite(fid_sum(r))), key=fid_sum, default=None)


def kept_epoch(output_dir):
    """The epoch whose generators best_netG_*.pth hold (best_netG.json, with both files there), or None."""
    out = Path(output_dir)
    try:
        epoch = json.loads((out / BEST).read_text())["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    both = all((out / f"best_netG_{d}.pth").is_file() for d in DIRECTIONS)
    return epoch if both and isinstance(epoch, int) and not isinstance(epoch, bool) else None


def metrics_table(metrics, kept=None):
    """The metrics.csv rows as an HTML table, the epoch with the lowest FID A→B + B→A in bold and marked "best",
    and the one whose generators best_netG_*.pth hold (kept: its epoch) marked "kept"."""
    sums = [fid_sum(m) for m in metrics]
    best = next((i for i, m in enumerate(metrics) if m is best_row(metrics)), None)
    head = ["epoch", "step"] + [f"{k} {d[0]}→{d[2]}" for d in DIRECTIONS for k in ("FID", "KID ×100")] + ["FID sum", ""]
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    for i, m in enumerate(metrics):
        cells = [number(m["epoch"], "g"), number(m.get("step", math.nan), ".0f")]
        for d in DIRECTIONS:
            kid, std = 100 * m.get(f"kid_{d}", math.nan), 100 * m.get(f"kid_std_{d}", math.nan)
            cells += [
                number(m.get(f"fid_{d}", math.nan)),
                f"{number(kid)} ± {number(std)}" if finite(std) else number(kid),
            ]
        notes = []
        if i == best:
            notes.append("best")
        if m["epoch"] == kept:
            notes.append("kept as best_netG_*")
        cells += [number(sums[i]), " · ".join(notes)]
        lines.append(
            f"<tr{' class=best' if i == best else ''}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        )
    return "\n".join(lines + ["</table>"])


def sample_grids(output_dir):
    """[(epoch, relative path)] of OUTPUT_DIR/samples/epoch_NNN.png, newest first."""
    found = []
    for path in (Path(output_dir) / "samples").glob("epoch_*.png"):
        match = re.fullmatch(r"epoch_(\d+)\.png", path.name)
        if match and path.is_file():
            found.append((int(match[1]), f"samples/{path.name}"))
    return sorted(found, reverse=True)


def figure_html(src, caption, alt):
    """One <figure>: the image, linked to itself, and its caption."""
    return (
        f'<figure><a href="{quote(src)}"><img src="{quote(src)}" alt="{html.escape(alt)}" loading="lazy"></a>'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def page_html(output_dir, data):
    """training.html: where the run stands, the curves, the metrics table and the sample grids, newest first."""
    out = Path(output_dir)
    name = html.escape(data["name"])
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>CycleGAN training: {name}</title>'
        f"<style>{PAGE_STYLE}</style></head><body>\n<h1>CycleGAN training: {name}</h1>"
    ]
    last = data["rows"][-1] if data["rows"] else {}
    status = f"last logged: step {last['step']:.0f}, epoch {last['epoch']:.2f}" if last else "nothing logged yet"
    if finite(last.get("seconds")):
        s = last["seconds"]
        status += f", training time {s // 3600:.0f}:{s % 3600 // 60:02.0f}:{s % 60:02.0f}"  # past 24 h too
    links = ' · <a href="index.html">test results</a>' if (out / "index.html").is_file() else ""
    if data["curves"]:
        links += ' · <a href="plots/overview.png">all curves in one PNG</a>'
    parts.append(f'<p class="note">{html.escape(status)}{links}</p>')
    if data["curves"]:
        parts.append(
            '<h2>Curves</h2>\n<div class="grid">'
            + "".join(figure_html(f"plots/{c}.svg", f"{c}.svg", TITLES[c]) for c in data["curves"])
            + "</div>"
        )
    if data["metrics"]:
        parts += [
            "<h2>FID and KID</h2>",
            f'<div class="wide">{metrics_table(data["metrics"], kept_epoch(out))}</div>',
            '<p class="note">translations of the test images against the real ones of the other domain</p>',
        ]
    grids = sample_grids(out)
    if grids:
        parts.append(
            '<h2>Samples, newest first</h2>\n<div class="grid">'
            + "".join(figure_html(src, f"epoch {epoch}", f"samples after epoch {epoch}") for epoch, src in grids)
            + "</div>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def draw(output_dir, decay_epoch=None, plots=True):
    """Redraw OUTPUT_DIR/plots/*.svg, plots/overview.png (unless not plots) and training.html from the files of the
    run; their paths. The page is written also when the plots cannot be (no matplotlib, an unwritable plots/), with
    the curves that are on disk, and the plots' error is raised after it; FileNotFoundError without losses.csv."""
    out = Path(output_dir)
    data = run_data(out, decay_epoch)
    data["name"] = shown(out.resolve().name or out)
    written, failed = [], None
    try:
        written = draw_plots(out / "plots", data) if plots and data["rows"] else []
    except Exception as e:  # the command turns it into one line, after the page is written
        failed = e
    if failed or not plots:
        data["curves"] = [c for c in data["curves"] if (out / "plots" / f"{c}.svg").is_file()]
    page = page_html(out, data).encode("utf-8")
    written.append(write_atomic(out / "training.html", lambda f: f.write(page)))
    if failed:
        raise failed
    return written


class Background:
    """Runs `python figures.py OUTPUT_DIR --quiet` in a subprocess, one at a time: the caller (the training loop)
    pays only for starting a process. A submit while one runs is remembered and run when it has ended (seen at the
    next submit, or at close); a submit when the run's files have not changed since the last one starts nothing. A
    process that cannot start, fails or crashes never raises here; after one failed redraw (its one warning line
    said why) the later ones run without a word, so the page stays current."""

    SCRIPT = Path(__file__).resolve().with_name("figures.py")

    def __init__(self):
        self.proc, self.pending, self.failed, self.drawn = None, None, False, None  # drawn: inputs of the last start

    def submit(self, output_dir, decay_epoch=None):
        """Redraw output_dir now, or once more after the redraw that is still running."""
        if self.proc is not None and self.proc.poll() is None:
            self.pending = (output_dir, decay_epoch)  # a newer submit replaces an older pending one
            return
        self.pending = None
        self._start(output_dir, decay_epoch)

    def close(self, timeout=60):
        """The last redraw, waited for within `timeout` seconds in all: a running one that a pending one would
        replace is stopped (it writes every file atomically), so the caller waits for one redraw at most; one that
        draws the curves as they are is waited for, and the page drawn after it (its plots are not drawn again). One
        still running at the timeout is left to finish on its own."""
        deadline = time.monotonic() + timeout
        (output_dir, decay_epoch), self.pending = self.pending or (None, None), None
        if output_dir is not None and (inputs := (decay_epoch, run_files(output_dir))) != self.drawn:
            if self.proc is not None and self.proc.poll() is None and curve_inputs(inputs) != curve_inputs(self.drawn):
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the whole redraw
            if self._wait(deadline):
                self._start(output_dir, decay_epoch)
        self._wait(deadline)

    def _wait(self, deadline):
        """Whether no redraw runs, after waiting for one until `deadline` (time.monotonic())."""
        try:
            return self.proc is None or self.proc.wait(max(0.0, deadline - time.monotonic())) is not None
        except subprocess.TimeoutExpired:
            return False

    def _start(self, output_dir, decay_epoch):
        """Start the redraw of output_dir, unless its files are as the last redraw found them; a process that
        cannot start is one warning line."""
        # The last redraw has ended here. Failed (exit 2): it said why, the later ones stay quiet; one stopped by close
        # (SIGTERM) or killed by a signal printed nothing.
        self.failed = self.failed or bool(self.proc and self.proc.returncode > 0)
        inputs = (decay_epoch, run_files(output_dir))
        if inputs == self.drawn:
            return
        cmd = [sys.executable, str(self.SCRIPT), str(output_dir), "--quiet"]
        if decay_epoch is not None:
            cmd += ["--decay_epoch", str(decay_epoch)]
        try:
            # A session of its own: Ctrl-C stops the training, which then asks for the last redraw; it does not
            # kill the redraw halfway with a traceback. stderr is the training's, for the one warning line.
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL if self.failed else None,
                start_new_session=True,
            )
            self.drawn = inputs
        except OSError as e:  # no interpreter to run (a removed environment): one line, the training goes on
            self.proc = None
            print(f"warning: figures not drawn ({e})", file=sys.stderr)


def curve_inputs(inputs):
    """Of Background's (decay_epoch, run_files): what plots/ is drawn from (the page also shows the rest)."""
    return inputs and (inputs[0], [f for f in inputs[1] if f[0] in ("losses.csv", "metrics.csv")])


def run_files(output_dir):
    """(name, size, mtime) of each file the figures and the page are drawn from: equal, nothing to redraw."""
    out = Path(output_dir)
    found = []
    for path in [out / n for n in ("losses.csv", "metrics.csv", BEST, "index.html")] + sorted(out.glob("samples/*")):
        try:
            st = path.stat()
            found.append((path.name, st.st_size, st.st_mtime_ns))
        except OSError:
            continue
    return found


def get_parser():
    """The command line: a run's folder, and where the lr decay starts."""
    p = argparse.ArgumentParser(description="Redraw the curves and training.html of a run from its files.")
    p.add_argument("output_dir", help="the run's folder (train.py's --output_dir): losses.csv, metrics.csv, samples/")
    p.add_argument(
        "--decay_epoch",
        type=float,
        default=None,
        help="train.py's --decay_epoch N: the lr falls from N + 1 epochs done on, marked there "
        "(default: where the logged lr in losses.csv first falls)",
    )
    p.add_argument("--quiet", action="store_true", help="no line when all went well (the background redraw)")
    return p


def main(args):
    """Check the folder, draw, and say so in one line (an error, a warning, or what was written)."""
    out = Path(args.output_dir)
    if not out.is_dir():
        sys.exit(f"error: {out} is not a folder: pass a run's output folder (train.py's --output_dir)")
    if not (out / "losses.csv").is_file():
        sys.exit(f"error: {out} has no losses.csv: train.py writes it from the first display interval on")
    try:
        written = draw(out, args.decay_epoch)
    except Exception as e:  # a bad file, a full disk, an unwritable plots/: one line, and a training run goes on
        message = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the message holds
        print(
            f"warning: figures not drawn ({message}); training goes on without them, and `python figures.py "
            f"{out}` draws them once the cause is fixed",
            file=sys.stderr,
        )
        return 2
    if not args.quiet:
        print(f"wrote {len(written)} files: {shown(out / 'training.html')}, {shown(out / 'plots')}/")
    return 0


if __name__ == "__main__":
    code = main(get_parser().parse_args())
    gc.freeze()  # no last collection over matplotlib's objects at exit: a tenth of a second of each redraw
    sys.exit(code)
