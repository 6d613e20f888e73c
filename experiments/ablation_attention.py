"""Ablation (not a test): the paper's generator against --attention, and test.py --mask_dir, on demo scenes that
carry a house which is the same in summer and winter (`python datasets.py demo --objects`).

    python experiments/ablation_attention.py                      # the quick start's run, seeds 1-3: ~30 min, 2 cores
    python experiments/ablation_attention.py --fid_weights W.pth   # with FID and KID (a local Inception weights file)

Each (generator, seed) trains train.py from scratch with the quick start's flags, then translates test/A with
test.py twice: whole, and with --mask_dir test/mask_A (the house black: kept). Against the true winter scenes
(test/truth_B, where the house is unchanged) it reports PSNR over the whole scene, inside the house (mask below
128) and outside it; for attention generators the mean attention inside and outside the house (1 = translated);
FID and KID of the whole translations against test/B where the Inception weights are given. The table goes to
stdout and to OUTPUT/ablation.md; each run's files stay in OUTPUT/<generator>_seed<s>/.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ablation_multiscale import peak_memory_run

ROOT = Path(__file__).resolve().parent.parent
QUICK_START = ["--size", "32", "--n_epochs", "2", "--decay_epoch", "1", "--lr", "0.0005", "--n_cpu", "0"]


def psnr(a, b):
    """PSNR in dB of two float arrays of 0-255 values (inf where they are equal)."""
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def region_psnrs(folder, data):
    """PSNR of folder/*.png against test/truth_B: (whole, inside the house, outside it), over all test images."""
    whole, inside, outside = [], [], []
    for truth_path in sorted((data / "test" / "truth_B").glob("*.png")):
        fake = np.asarray(Image.open(folder / truth_path.name).convert("RGB"), dtype=np.float64)
        truth = np.asarray(Image.open(truth_path).convert("RGB"), dtype=np.float64)
        house = np.asarray(Image.open(data / "test" / "mask_A" / truth_path.name)) < 128
        whole.append((fake, truth))
        inside.append((fake[house], truth[house]))
        outside.append((fake[~house], truth[~house]))
    return tuple(
        psnr(np.concatenate([f.ravel() for f, _ in pairs]), np.concatenate([t.ravel() for _, t in pairs]))
        for pairs in (whole, inside, outside)
    )


def attention_split(folder, data):
    """Mean attention map value (0-1) inside and outside the house, over the test images."""
    inside, outside = [], []
    for path in sorted(folder.glob("*.png")):
        a = np.asarray(Image.open(path), dtype=np.float64) / 255
        house = np.asarray(Image.open(data / "test" / "mask_A" / path.name)) < 128
        inside.append(a[house])
        outside.append(a[~house])
    return float(np.concatenate(inside).mean()), float(np.concatenate(outside).mean())


def translate(args, data, run, out, *extra):
    """test.py on test/A with the run's G_A2B into out; its stdout."""
    cmd = [
        sys.executable,
        str(ROOT / "test.py"),
        "--input",
        str(data / "test" / "A"),
        "--output_dir",
        str(out),
        "--generator",
        str(run / "netG_A2B.pth"),
        "--n_cpu",
        "0",
        *extra,
    ]
    if args.fid_weights:
        cmd += ["--metrics", "--fid_weights", args.fid_weights, "--dataroot", str(data)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"test.py failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    return r.stdout


def one_run(args, data, attention, seed):
    """Train, translate whole and masked, measure: a dict of the table's columns."""
    name = "attention" if attention else "paper"
    run = Path(args.output) / f"{name}_seed{seed}"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--dataroot",
        str(data),
        "--output_dir",
        str(run),
        *QUICK_START,
        "--seed",
        str(seed),
        "--no_visdom",
    ] + ["--attention"] * attention
    if not (run / "netG_A2B.pth").is_file():  # a finished run is reused: add seeds or variants to an earlier table
        code, log, _ = peak_memory_run(cmd)
        if code:
            sys.exit(f"training failed ({' '.join(cmd)}):\n{log[-3000:]}")
    row = {"generator": name, "seed": seed}
    whole = translate(args, data, run, run / "whole")
    translate(args, data, run, run / "masked", "--mask_dir", str(data / "test" / "mask_A"))
    row["whole"] = region_psnrs(run / "whole" / "B", data)
    row["masked"] = region_psnrs(run / "masked" / "B", data)
    row["attention"] = attention_split(run / "whole" / "attention_B", data) if attention else None
    found = re.search(r"^A2B\s.*?\s([\d.]+)\s+([\d.]+)", whole, re.M)
    row["fid"], row["kid"] = (float(found[1]), float(found[2])) if found else (None, None)
    return row


def table(args, rows):
    """The markdown table: one line per generator, each cell the seeds' values in order."""

    def cell(rs, get, fmt):
        values = [get(r) for r in rs]
        return "not measured" if any(v is None for v in values) else " / ".join(format(v, fmt) for v in values)

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "CPU"
    )
    lines = [
        f"demo scenes with a house, {args.n_train} train and {args.n_test} test per domain; the quick start's "
        f"training ({' '.join(QUICK_START)}); {cpu}; per seed ({', '.join(map(str, args.seeds))}); PSNR in dB "
        f"against test/truth_B",
        "",
        "| generator | test.py | PSNR whole | PSNR house | PSNR outside | attention house / outside | FID A→B | "
        "KID×100 A→B |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("paper", "attention"):
        rs = [r for r in rows if r["generator"] == name]
        if not rs:
            continue
        for how in ("whole", "masked"):
            att = (
                cell(rs, lambda r: r["attention"] and r["attention"][0], ".3f")
                + " (house); "
                + cell(rs, lambda r: r["attention"] and r["attention"][1], ".3f")
                + " (outside)"
                if name == "attention"
                else "n/a"
            )
            lines.append(
                f"| {name} | {'--mask_dir' if how == 'masked' else 'whole'} | "
                + " | ".join(cell(rs, lambda r, k=k, how=how: r[how][k], ".2f") for k in range(3))
                + f" | {att if how == 'whole' else ''} | "
                + (
                    f"{cell(rs, lambda r: r['fid'], '.1f')} | {cell(rs, lambda r: r['kid'], '.2f')} |"
                    if how == "whole"
                    else " | |"
                )
            )
    return "\n".join(lines)


def main(args):
    sys.path.insert(0, str(ROOT))
    from datasets import make_demo

    data = Path(args.output) / "data"
    if not (data / "test" / "mask_A").is_dir():
        make_demo(data, n_train=args.n_train, n_test=args.n_test, objects=True)
    rows = []
    for attention in (False, True):
        for seed in args.seeds:
            rows.append(one_run(args, data, attention, seed))
            print(f"  {rows[-1]}", flush=True)
    text = table(args, rows)
    print("\n" + text)
    (Path(args.output) / "ablation.md").write_text(text + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/ablation_attention", help="where the data, runs and table go")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--n_train", type=int, default=300, help="training scenes per domain (the demo's)")
    p.add_argument("--n_test", type=int, default=20)
    p.add_argument("--fid_weights", default=None, help="FID/KID with a local Inception weights file")
    main(p.parse_args())
