"""figures.py on synthetic runs: every SVG holds the logged points, the page links only what exists, the command
works on today's losses.csv, and a failure to draw is one line that never reaches the caller."""

import math
import re
import signal
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from urllib.parse import unquote

import pytest
from PIL import Image

import figures
from conftest import run_script

# The formats as train.py and the metrics writer write them: copied, not imported, so a change to them shows here.
LOSSES_HEADER = "step,epoch,loss_G,loss_G_identity,loss_G_GAN,loss_G_cycle,loss_D,loss_D_A,loss_D_B,lr,seconds"
METRICS_HEADER = "epoch,step,seconds,fid_A2B,kid_A2B,kid_std_A2B,fid_B2A,kid_B2A,kid_std_B2A"
METRICS_ROWS = ["1,40,6.0,80.5,0.0412,0.0031,90.75,0.0523,0.0042", "2,80,12.0,60.25,0.0301,0.0022,70.5,0.0398,0.0035"]
LOSS_CURVES = ["loss_G", "loss_D", "loss_G_cycle", "loss_G_GAN", "loss_G_identity", "loss_D_A", "loss_D_B", "lr"]
SVG = "{http://www.w3.org/2000/svg}"


def write_run(out, epochs=2, per_epoch=4, lr=None, metrics=True, samples=True, tail=""):
    """A run's folder as train.py leaves it: losses.csv (per_epoch intervals of 10 steps per epoch), metrics.csv and
    samples/epoch_NNN.png of a different size each (so the order on the page can be told apart)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [LOSSES_HEADER]
    for k in range(1, epochs * per_epoch + 1):
        losses = [3.0 / k + 0.1 * i + 0.05 * (k % 2) for i in range(7)]  # zigzag: no three points in a line
        rate = lr if lr is not None else 2e-4 * min(1.0, 1.0 - (k / per_epoch - 1) / epochs)
        lines.append(
            ",".join([str(10 * k), f"{k / per_epoch:g}", *(f"{v:.6f}" for v in losses), str(rate), f"{1.5 * k}"])
        )
    (out / "losses.csv").write_text("\n".join(lines) + "\n" + tail)
    if metrics:
        (out / "metrics.csv").write_text("\n".join([METRICS_HEADER, *METRICS_ROWS[:epochs]]) + "\n")
    for epoch in range(1, epochs + 1) if samples else []:
        (out / "samples").mkdir(exist_ok=True)
        Image.new("RGB", (60 + epoch, 40), (40 * epoch, 90, 160)).save(out / "samples" / f"epoch_{epoch:03d}.png")
    return out


def group(svg_path, gid):
    """The <g id=gid> element of an SVG file (parsing it is the XML check), or None."""
    root = ET.parse(svg_path).getroot()
    found = [g for g in root.iter(f"{SVG}g") if g.get("id") == gid]
    assert len(found) <= 1, f"{gid} twice in {svg_path.name}"
    return found[0] if found else None


def vertices(svg_path, gid):
    """Points of the line drawn in group gid: the M/L commands of its path."""
    g = group(svg_path, gid)
    return sum(len(re.findall(r"[ML]\s", p.get("d"))) for p in g.iter(f"{SVG}path"))


def markers(svg_path, gid):
    """Markers of group gid: matplotlib writes one <use> per marker."""
    return len(list(group(svg_path, gid).iter(f"{SVG}use")))


class Page(HTMLParser):
    """What training.html links to, and the text of its table cells, row by row."""

    def __init__(self, text):
        super().__init__()
        self.links, self.rows, self.cell = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag == "tr":
            self.rows.append([])
        if tag == "td":
            self.cell = ""

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag == "td":
            self.rows[-1].append(self.cell)
            self.cell = None


def test_two_epoch_run_gives_every_figure_and_a_page_that_links_only_what_exists(tmp_path):
    out = write_run(tmp_path / "run 1")
    (out / "index.html").write_text("<html></html>")
    written = figures.draw(out, decay_epoch=1)
    plots = out / "plots"
    curves = LOSS_CURVES + ["fid", "kid"]
    assert sorted(written) == sorted(
        [plots / f"{c}.svg" for c in curves] + [plots / "overview.png", out / "training.html"]
    )
    for name in LOSS_CURVES:
        svg = plots / f"{name}.svg"
        assert vertices(svg, "interval-mean") == 8, name  # one per row of losses.csv
        assert markers(svg, "epoch-mean") == 2, name  # one per finished epoch
        assert group(svg, "lr-decay") is not None, name
        assert ET.parse(svg).getroot().get("id") == f"figure-{name}"
    # --decay_epoch 1: epochs 0 and 1 run at the full rate, so the mark stands at 2 epochs done, the last epoch mean.
    decay_x = float(
        re.match(r"M\s*([-\d.]+)", next(group(plots / "lr.svg", "lr-decay").iter(f"{SVG}path")).get("d"))[1]
    )
    last_mean = [float(u.get("x")) for u in group(plots / "lr.svg", "epoch-mean").iter(f"{SVG}use")][-1]
    assert decay_x == pytest.approx(last_mean, abs=0.01)
    for d in ("A2B", "B2A"):
        assert markers(plots / "fid.svg", f"fid-{d}") == 2 and markers(plots / "kid.svg", f"kid-{d}") == 2
    with Image.open(plots / "overview.png") as im:  # 10 curves: 3 rows of 4 panels of 3.25 x 2.6 in at 150 dpi
        assert im.size == (1950, 1170)
    assert not [p for p in plots.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind

    page = Page((out / "training.html").read_text(encoding="utf-8"))
    assert page.links and all((out / unquote(link)).is_file() for link in page.links), page.links
    assert "index.html" in page.links and "plots/overview.png" in page.links
    grids = [link for link in page.links if link.startswith("samples/")]
    assert grids[0] == "samples/epoch_002.png" and "samples/epoch_001.png" in grids  # newest first
    table = {row[0]: row for row in page.rows if row}
    assert table["2"][2:5] == ["60.25", "3.01 ± 0.22", "70.50"] and table["2"][-1] == "best"
    assert table["1"][-1] == "" and table["1"][2] == "80.50"


def test_the_same_data_gives_the_same_bytes(tmp_path):
    out = write_run(tmp_path / "run", metrics=False, samples=False)
    figures.draw(out, decay_epoch=0)
    first = {p.name: p.read_bytes() for p in (out / "plots").iterdir()}
    figures.draw(out, decay_epoch=0)
    assert first == {p.name: p.read_bytes() for p in (out / "plots").iterdir()}
    assert b"<dc:date>" not in first["loss_G.svg"]


def test_nan_lr_and_a_partial_last_line_are_tolerated(tmp_path):
    out = write_run(tmp_path / "run", lr="nan", metrics=False, samples=False, tail="90,2.25,1.2,0.4")
    written = figures.draw(out)  # no checkpoint.pth: no decay marked
    assert (out / "plots" / "lr.svg") in written and not (out / "plots" / "fid.svg").exists()
    assert vertices(out / "plots" / "loss_G.svg", "interval-mean") == 8  # the cut line is not one of them
    assert group(out / "plots" / "loss_G.svg", "lr-decay") is None
    with Image.open(out / "plots" / "overview.png") as im:  # 8 curves: 2 rows
        assert im.size == (1950, 780)
    page = Page((out / "training.html").read_text(encoding="utf-8"))
    assert not [row for row in page.rows if row] and "index.html" not in page.links


@pytest.mark.parametrize("decay_epoch", [0, 1, 3])
def test_the_decay_epoch_is_read_from_the_logged_lr(decay_epoch):
    from utils import linear_decay  # train.py logs args.lr * lr_lambda(epochs done before the row's epoch)

    lr_lambda = linear_decay(6, decay_epoch)
    rows = [{"epoch": k / 3, "lr": 2e-4 * lr_lambda(math.ceil(k / 3) - 1)} for k in range(1, 19)]
    assert figures.logged_decay(rows) == decay_epoch
    assert figures.logged_decay(rows[: 3 * (decay_epoch + 1)]) is None  # not fallen yet


def test_the_decay_mark_is_drawn_once_the_lr_falls(tmp_path):
    out = write_run(tmp_path / "run", metrics=False, samples=False)  # falls in epoch 2: --decay_epoch 0
    figures.draw(out)
    assert group(out / "plots" / "loss_D.svg", "lr-decay") is not None
    write_run(out, metrics=False, samples=False, lr=2e-4)
    figures.draw(out)  # a constant lr: no mark
    assert group(out / "plots" / "loss_D.svg", "lr-decay") is None


def test_the_command_redraws_a_run_and_refuses_a_wrong_folder_in_one_line(tmp_path):
    out = write_run(tmp_path / "run")
    r = run_script("figures.py", out, "--decay_epoch", "1")
    assert r.returncode == 0 and r.stderr == "" and len(r.stdout.splitlines()) == 1, r.stderr
    assert (out / "training.html").is_file() and markers(out / "plots" / "loss_G.svg", "epoch-mean") == 2
    for folder in (tmp_path / "missing", tmp_path):  # no such folder; a folder without losses.csv
        r = run_script("figures.py", folder)
        assert r.returncode == 1 and r.stdout == "" and r.stderr.startswith("error: "), r.stderr
        assert len(r.stderr.splitlines()) == 1


def test_draw_raises_where_plots_cannot_be_written(tmp_path):
    out = write_run(tmp_path / "run")
    (out / "plots").write_text("a file where the folder should be")
    with pytest.raises(OSError):
        figures.draw(out)


def test_background_turns_an_unwritable_plots_folder_into_one_warning(tmp_path, capfd):
    out = write_run(tmp_path / "run")
    (out / "plots").write_text("a file where the folder should be")
    background = figures.Background()
    background.submit(out, 1)  # as at a run's end: the redraw starts before the checkpoint, the sheet comes after
    (out / "samples" / "epoch_003.png").write_bytes((out / "samples" / "epoch_001.png").read_bytes())
    background.submit(out, 1)
    background.close(timeout=60)  # waits for the first, then draws the page: one warning line in all
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("warning: figures not drawn ("), err
    assert background.proc.returncode == 2 and 'src="samples/epoch_003.png"' in (out / "training.html").read_text()


@pytest.fixture
def fake_script(tmp_path, monkeypatch):
    """Background's script replaced by one that logs its arguments, sleeps a little and exits with `code`."""
    log = tmp_path / "calls.txt"
    script = tmp_path / "fake_figures.py"
    script.write_text(
        "import sys, time\n"
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "time.sleep(0.3)\n"
        "sys.exit(int(sys.argv[1].split('-')[-1]))\n"
    )
    monkeypatch.setattr(figures.Background, "SCRIPT", script)
    return log


def test_background_runs_one_at_a_time_and_the_newest_pending_once(fake_script):
    background = figures.Background()
    for k in range(3):  # the first starts; the second and third arrive while it runs: only the third is redrawn
        background.submit(f"run-{k}", k)
    assert background.pending == ("run-2", 2)
    first = background.proc
    background.close(timeout=30)  # the running redraw would be replaced: stopped, so the caller waits for one
    assert first.returncode == -signal.SIGTERM
    calls = fake_script.read_text().splitlines()
    assert calls[-1] == "run-2 --quiet --decay_epoch 2" and set(calls[:-1]) <= {"run-0 --quiet --decay_epoch 0"}
    assert background.pending is None and background.proc.returncode == 2  # a failed redraw: no exception


def test_background_starts_nothing_when_the_run_files_are_unchanged(fake_script, tmp_path):
    out = tmp_path / "run-0"
    out.mkdir()
    (out / "losses.csv").write_text(LOSSES_HEADER + "\n")
    background = figures.Background()
    for _ in range(2):  # the second finds what the first found: nothing to redraw
        background.submit(out)
        background.close(timeout=30)
    (out / "samples").mkdir()
    (out / "samples" / "epoch_001.png").write_bytes(b"a new sheet")
    background.submit(out)
    background.close(timeout=30)
    assert len(fake_script.read_text().splitlines()) == 2


def test_a_running_redraw_of_the_same_curves_is_waited_for_and_the_page_drawn_after_it(fake_script, tmp_path):
    """The run's last redraw starts before the checkpoint is written; the sheet comes after it. Closing then waits
    for it (its plots are the last ones) and redraws once more for the page; new losses would stop it instead."""
    out = tmp_path / "run-0"  # the fake script exits with the number after the last "-": 0, a redraw that went well
    out.mkdir()
    (out / "losses.csv").write_text(LOSSES_HEADER + "\n10,1.0,1,1,1,1,1,1,1,0.0002,1.0\n")
    background = figures.Background()
    background.submit(out, 0)
    first = background.proc
    (out / "samples").mkdir()
    (out / "samples" / "epoch_001.png").write_bytes(b"the sheet, written while the redraw runs")
    background.submit(out, 0)
    background.close(timeout=30)
    assert first.returncode == 0 and background.proc is not first and background.proc.returncode == 0
    assert fake_script.read_text().splitlines() == [f"{out} --quiet --decay_epoch 0"] * 2

    (out / "samples" / "epoch_002.png").write_bytes(b"a sheet")
    background.submit(out, 0)
    stale = background.proc
    with open(out / "losses.csv", "a") as f:
        f.write("30,3.0,1,1,1,1,1,1,1,0.0002,3.0\n")
    background.submit(out, 0)
    background.close(timeout=30)  # new losses: the running redraw draws old curves, stopped
    assert stale.returncode == -signal.SIGTERM and background.proc.returncode == 0


def test_background_never_raises_when_no_process_can_start(fake_script, monkeypatch, capfd):
    monkeypatch.setattr(sys, "executable", str(fake_script.with_name("no-python-here")))
    background = figures.Background()
    background.submit("run-0")
    background.close()
    err = capfd.readouterr().err
    assert err.startswith("warning: figures not drawn (") and len(err.splitlines()) == 1
    assert not fake_script.exists()


def test_a_run_that_logged_nothing_yet_gets_a_page_and_no_plots(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "losses.csv").write_text(LOSSES_HEADER + "\n")
    assert figures.draw(out) == [out / "training.html"] and not (out / "plots").exists()
    assert "nothing logged yet" in (out / "training.html").read_text(encoding="utf-8")


def test_histories_keep_whole_rows_only(tmp_path):
    """A resumed run reads its CSV histories back: a line cut inside its last field (a writer killed mid-line) and a
    cell that is not a number are left out, not kept truncated or raised on; text columns stay text."""
    import files

    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,fid_A2B,weights\n1,6,30.5,abc\n2,x,28.0,abc\n3,18,27.25,ab")  # the last cut short
    rows = files.keep_rows(path, ["epoch", "step", "fid_A2B", "weights"], "epoch", 5, text=("weights",))
    assert rows == [{"epoch": 1, "step": 6, "fid_A2B": 30.5, "weights": "abc"}]
    assert path.read_text().splitlines() == ["epoch,step,fid_A2B,weights", "1,6,30.5,abc"]


def test_a_redraw_draws_only_the_files_whose_curves_changed(tmp_path):
    out = write_run(tmp_path / "run")
    first = {p.name for p in figures.draw(out)}
    assert {"loss_G.svg", "fid.svg", "overview.png", "training.html"} <= first
    assert [p.name for p in figures.draw(out)] == ["training.html"]  # nothing changed: the page only
    metrics = (out / "metrics.csv").read_text().splitlines()
    (out / "metrics.csv").write_text("\n".join(metrics[:-1]) + "\n")  # one evaluation fewer: fid and kid change
    assert {p.name for p in figures.draw(out)} == {"fid.svg", "kid.svg", "overview.png", "training.html"}
    (out / "plots" / "lr.svg").unlink()  # a file gone is drawn again
    assert {p.name for p in figures.draw(out)} == {"lr.svg", "training.html"}
