"""Ablation (not a test): one discriminator scale against two (and three where the size allows) on the demo's scenes.

    python experiments/ablation_multiscale.py       # 64 px, --n_blocks 6, K = 1 and 2, seeds 1 and 2
    python experiments/ablation_multiscale.py --size 256 --cuda --scales 1 2 3 --n_train 1000 --epochs 10   # on a GPU

Each run trains train.py from scratch on `python datasets.py demo` scenes drawn at 1.12 x --size, then translates the
test split with test.py and reports: PSNR of G_A2B(test/A) against the true winter scenes (test/truth_B), FID and
KID of the translations against test/B (test.py --metrics; only where the Inception weights are on disk or given
with --fid_weights), a sharpness ratio (mean Laplacian energy of the translations over that of the real winter test
images: 1.0 is as sharp as real), seconds per training step and the training process's peak memory. The table goes
to stdout and to OUTPUT/ablation.md; everything each run wrote stays in OUTPUT/K<k>_seed<s>/.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def laplacian_energy(path):
    """Mean squared 4-neighbour Laplacian of an image's grey levels (0-255): how much fine detail it holds."""
    g = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(np.mean(lap**2))


def peak_memory_run(cmd):
    """Run cmd; (return code, its output, peak RSS in MiB of the process itself, from its rusage)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), out, usage.ru_maxrss / 1024


def one_run(args, data, scales, seed):
    """Train, translate, measure: a dict of the table's columns."""
    out = Path(args.output) / f"K{scales}_seed{seed}"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--dataroot",
        str(data),
        "--output_dir",
        str(out),
        "--size",
        str(args.size),
        "--n_blocks",
        str(args.n_blocks),
        "--d_scales",
        str(scales),
        "--seed",
        str(seed),
        "--n_epochs",
        str(args.epochs),
        "--decay_epoch",
        str(args.epochs // 2),
        "--lr",
        str(args.lr),
        "--n_cpu",
        str(args.n_cpu),
        "--no_visdom",
        "--no_figures",
        "--n_samples",
        "0",
    ] + ["--cuda"] * args.cuda
    t0 = time.time()
    code, log, peak = peak_memory_run(cmd)
    if code:
        sys.exit(f"training failed ({' '.join(cmd)}):\n{log[-3000:]}")
    rows = (out / "losses.csv").read_text().splitlines()
    last = dict(zip(rows[0].split(","), rows[-1].split(",")))
    test = [
        sys.executable,
        str(ROOT / "test.py"),
        "--dataroot",
        str(data),
        "--output_dir",
        str(out / "test"),
        "--generator_A2B",
        str(out / "netG_A2B.pth"),
        "--generator_B2A",
        str(out / "netG_B2A.pth"),
        "--n_cpu",
        str(args.n_cpu),
    ] + ["--cuda"] * args.cuda
    metrics = args.fid_weights is not None or args.metrics
    test += ["--metrics"] * metrics + (["--fid_weights", args.fid_weights] if args.fid_weights else [])
    r = subprocess.run(test, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"test.py failed:\n{r.stderr[-3000:]}")
    psnr = float(re.search(r"truth_B: ([\d.]+) dB", r.stdout)[1])
    fid = kid = None
    if metrics:
        found = re.search(r"^A2B\s.*\s([\d.]+)\s+([\d.]+)\s*$", r.stdout, re.M)  # the line's last two: FID, KID
        fid, kid = (float(found[1]), float(found[2])) if found else (None, None)
    fakes = sorted((out / "test" / "B").glob("*.png"))
    reals = sorted((Path(data) / "test" / "B").glob("*.png"))
    sharp = statistics.mean(map(laplacian_energy, fakes)) / statistics.mean(map(laplacian_energy, reals))
    return {
        "K": scales,
        "seed": seed,
        "psnr": psnr,
        "fid": fid,
        "kid": kid,
        "sharpness": sharp,
        "s_per_step": float(last["seconds"]) / int(last["step"]),
        "peak_mib": peak,
        "wall": time.time() - t0,
    }


def main(args):
    sys.path.insert(0, str(ROOT))
    from datasets import make_demo

    data = Path(args.output) / "data"
    if not (data / "test" / "truth_B").is_dir():
        make_demo(data, size=int(1.12 * args.size) + 1, n_train=args.n_train, n_test=args.n_test)
    results = []
    for scales in args.scales:
        for seed in args.seeds:
            results.append(one_run(args, data, scales, seed))
            print(f"  K={scales} seed {seed}: {results[-1]}", flush=True)
    cpu = (
        "CUDA"
        if args.cuda
        else next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "CPU"
        )
    )

    def cell(rows, key, fmt):
        values = [r[key] for r in rows if r[key] is not None]
        return " / ".join(format(v, fmt) for v in values) if values else "n/a"

    lines = [
        f"{args.size} px crops of demo scenes drawn at {int(1.12 * args.size) + 1} px, --n_blocks {args.n_blocks}, "
        f"{args.n_train} train and {args.n_test} test scenes per domain, {args.epochs} epochs, lr {args.lr}; "
        f"{cpu}; per seed ({', '.join(map(str, args.seeds))})",
        "",
        "| D scales | PSNR vs truth, dB | FID A→B | KID×100 A→B | sharpness (real = 1) | s/step | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for scales in args.scales:
        rows = [r for r in results if r["K"] == scales]
        lines.append(
            f"| {scales} | {cell(rows, 'psnr', '.2f')} | {cell(rows, 'fid', '.1f')} | {cell(rows, 'kid', '.2f')} "
            f"| {cell(rows, 'sharpness', '.3f')} | {cell(rows, 's_per_step', '.3f')} | "
            f"{cell(rows, 'peak_mib', '.0f')} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (Path(args.output) / "ablation.md").write_text(table + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/ablation_multiscale", help="where the data, runs and table go")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n_blocks", type=int, default=6)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n_train", type=int, default=200, help="training scenes per domain (steps per epoch)")
    p.add_argument("--n_test", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.0005, help="the demo's (2.5x the paper's, for short runs)")
    p.add_argument("--n_cpu", type=int, default=0)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--metrics", action="store_true", help="FID/KID with the Inception weights torch-fidelity fetches")
    p.add_argument("--fid_weights", default=None, help="FID/KID with a local Inception weights file")
    main(p.parse_args())
