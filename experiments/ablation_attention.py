"""Ablation (not a test): the paper's generator against --attention and its variants, and test.py --mask_dir, on demo
scenes that carry a house which is the same in summer and winter (`python datasets.py demo --objects`).

    python experiments/ablation_attention.py                        # paper and attention, seeds 1-3, 600 steps each
    python experiments/ablation_attention.py --epochs 4              # 1,200 steps each
    python experiments/ablation_attention.py --variants paper attention floor_0.1 no_sparsity sparsity_0.1
    python experiments/ablation_attention.py --fid_weights W.pth     # with FID and KID (a local Inception weights file)

Each (variant, seed) trains train.py from scratch with the quick start's flags (2 epochs of 300 steps at 32 px) and
the variant's, then translates test/A with test.py twice: whole, and with --mask_dir test/mask_A (the house black:
kept). Against the true winter scenes (test/truth_B, where the house is unchanged) it reports PSNR over the whole
scene, inside the house (mask below 128) and outside it; for attention generators the map's mean inside and outside
the house (1 = translated) and its AUC as a house detector (1 - map as the score); FID and KID of the whole
translations against test/B where the Inception weights are given. "meets" is the success test of issue 35 on
every seed: map < 0.3 on the house and > 0.7 outside, PSNR inside the house >= 18 dB, outside within 1 dB of the
paper's of the same seed. Attention runs train with --mask_dir test/mask_A, so their losses.csv follows the map
on the houses (map_B_object) and elsewhere (map_B_rest) while they learn. The table goes to stdout and
OUTPUT/ablation_<steps>steps.md; each run stays in OUTPUT/<variant>_<steps>steps_seed<s>, with montage.png (input,
truth, translation, map of six test scenes); a finished run is reused, so seeds and variants can be added to a table.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
QUICK_START = ["--size", "32", "--lr", "0.0005", "--n_cpu", "0", "--no_visdom", "--no_figures"]
VARIANTS = {  # name -> train.py flags
    "paper": [],
    "attention": ["--attention"],
    "no_sparsity": ["--attention", "--lambda_sparsity", "0"],
    "sparsity_0.1": ["--attention", "--lambda_sparsity", "0.1"],
    "floor_0.1": ["--attention", "--lambda_sparsity", "-0.1"],  # a floor against maps of 0, not a pull to keep
    "floor_0.3": ["--attention", "--lambda_sparsity", "-0.3"],
    "no_identity": ["--attention", "--lambda_identity", "0"],
}


def psnr(a, b):
    """PSNR in dB of two float arrays of 0-255 values (inf where they are equal)."""
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def auc(scores, positives):
    """Area under the ROC curve of scores for the boolean positives (Mann-Whitney, ties counted half)."""
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based, ties share their mean rank
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def houses(data):
    """{test image name: its house mask (H, W) bool}."""
    return {p.name: np.asarray(Image.open(p)) < 128 for p in sorted((data / "test" / "mask_A").glob("*.png"))}


def region_psnrs(folder, data):
    """PSNR of folder/*.png against test/truth_B: (whole, inside the house, outside it), over all test images."""
    pairs = {"whole": [], "house": [], "outside": []}
    for name, house in houses(data).items():
        fake = np.asarray(Image.open(folder / name).convert("RGB"), dtype=np.float64)
        truth = np.asarray(Image.open(data / "test" / "truth_B" / name).convert("RGB"), dtype=np.float64)
        for region, keep in (("whole", np.ones_like(house)), ("house", house), ("outside", ~house)):
            pairs[region].append((fake[keep].ravel(), truth[keep].ravel()))
    return tuple(psnr(np.concatenate([f for f, _ in p]), np.concatenate([t for _, t in p])) for p in pairs.values())


def map_scores(folder, data):
    """(mean map on the house, mean outside, AUC of 1 - map as a house detector) over the test images."""
    maps, masks = [], []
    for name, house in houses(data).items():
        maps.append(np.asarray(Image.open(folder / name), dtype=np.float64).ravel() / 255)
        masks.append(house.ravel())
    a, house = np.concatenate(maps), np.concatenate(masks)
    return float(a[house].mean()), float(a[~house].mean()), auc(1 - a, house)


def translate(args, data, run, out, *extra):
    """test.py on test/A with the run's G_A2B into out; its stdout."""
    cmd = [sys.executable, str(ROOT / "test.py"), "--input", str(data / "test" / "A"), "--output_dir", str(out)]
    cmd += ["--generator", str(run / "netG_A2B.pth"), "--n_cpu", "0", *extra]
    if args.fid_weights:
        cmd += ["--metrics", "--fid_weights", args.fid_weights, "--reference", str(data / "test" / "B")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"test.py failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    return r.stdout


def montage(run, data, n=6, zoom=4):
    """run/montage.png: for the first n test scenes, a row of the summer input, the true winter scene, G_A2B's
    translation and, for attention generators, its map (white: translated)."""
    rows = []
    for name in list(houses(data))[:n]:
        folders = [data / "test" / "A", data / "test" / "truth_B", run / "whole" / "B", run / "whole" / "attention_B"]
        cells = [np.asarray(Image.open(f / name).convert("RGB")) for f in folders if (f / name).is_file()]
        rows.append(np.concatenate(cells, axis=1))
    picture = Image.fromarray(np.concatenate(rows, axis=0))
    picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST).save(run / "montage.png")


def one_run(args, data, variant, seed):
    """Train, translate whole and masked, measure: a dict of the table's columns."""
    run = Path(args.output) / f"{variant}_{args.epochs * 300}steps_seed{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataroot", str(data), "--output_dir", str(run), *QUICK_START]
    cmd += ["--n_epochs", str(args.epochs), "--decay_epoch", str(args.epochs // 2), "--seed", str(seed)]
    cmd += VARIANTS[variant]
    if "--attention" in cmd:  # losses.csv follows the map on and off the test scenes' houses while it trains
        cmd += ["--mask_dir", str(data / "test" / "mask_A")]
    if not (run / "netG_A2B.pth").is_file():
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"training failed ({' '.join(cmd)}):\n{(r.stdout + r.stderr)[-3000:]}")
    row = {"variant": variant, "seed": seed}
    whole = translate(args, data, run, run / "whole")
    translate(args, data, run, run / "masked", "--mask_dir", str(data / "test" / "mask_A"))
    row["whole"] = region_psnrs(run / "whole" / "B", data)
    row["masked"] = region_psnrs(run / "masked" / "B", data)
    maps = run / "whole" / "attention_B"
    row["map"] = map_scores(maps, data) if maps.is_dir() else None
    montage(run, data)
    found = re.search(r"^A2B\s.*\s([\d.]+)\s+([\d.]+)\s*$", whole, re.M)  # the line's last two: FID, KID
    row["fid"], row["kid"] = (float(found[1]), float(found[2])) if found else (None, None)
    return row


def meets(row, paper):
    """Issue 35's success test for one seed's run (paper: the paper's row of the same seed, or None)."""
    if row["map"] is None or paper is None:
        return False
    house_map, outside_map, _ = row["map"]
    _, house, outside = row["whole"]
    return house_map < 0.3 and outside_map > 0.7 and house >= 18 and outside >= paper["whole"][2] - 1


def cell(rows, get, fmt):
    values = [get(r) for r in rows]
    return "n/a" if any(v is None for v in values) else " / ".join(format(v, fmt) for v in values)


def psnr_cells(rows, how):
    return [cell(rows, lambda r, k=k: r[how][k], ".2f") for k in range(3)]


def table(args, rows):
    """The markdown table: two lines per variant (test.py whole, --mask_dir), each cell the seeds' values in order."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "CPU")
    training = f"{' '.join(QUICK_START)} --n_epochs {args.epochs} --decay_epoch {args.epochs // 2}"
    lines = [
        f"demo scenes with a house, {args.n_train} train and {args.n_test} test per domain; {args.epochs * 300} steps "
        f"({training}); {cpu}; per seed ({', '.join(map(str, args.seeds))}); PSNR in dB against test/truth_B",
        "",
        "| variant | test.py | PSNR whole | PSNR house | PSNR outside | map: house | map: outside | map AUC | meets | "
        "FID A→B | KID×100 A→B |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    papers = {r["seed"]: r for r in rows if r["variant"] == "paper"}
    for variant in args.variants:
        rs = [r for r in rows if r["variant"] == variant]
        maps = [cell(rs, lambda r, k=k: r["map"] and r["map"][k], ".3f") for k in range(3)]
        verdicts = ["yes" if meets(r, papers.get(r["seed"])) else "no" for r in rs]
        ok = "n/a" if variant == "paper" else " / ".join(verdicts)
        metrics = [cell(rs, lambda r: r["fid"], ".1f"), cell(rs, lambda r: r["kid"], ".2f")]
        lines.append(f"| {variant} | whole | " + " | ".join([*psnr_cells(rs, "whole"), *maps, ok, *metrics]) + " |")
        lines.append(f"| {variant} | `--mask_dir` | " + " | ".join(psnr_cells(rs, "masked")) + " | | | | | | |")
    return "\n".join(lines)


def main(args):
    sys.path.insert(0, str(ROOT))
    from datasets import make_demo

    data = Path(args.output) / "data"
    if not (data / "test" / "mask_A").is_dir():
        make_demo(data, n_train=args.n_train, n_test=args.n_test, objects=True)
    rows = []
    for variant in args.variants:
        for seed in args.seeds:
            rows.append(one_run(args, data, variant, seed))
            print(f"  {rows[-1]}", flush=True)
    text = table(args, rows)
    print("\n" + text)
    (Path(args.output) / f"ablation_{args.epochs * 300}steps.md").write_text(text + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/ablation_attention", help="where the data, runs and table go")
    p.add_argument("--variants", nargs="+", default=["paper", "attention"], choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=2, help="epochs of 300 steps (the quick start: 2)")
    p.add_argument("--n_train", type=int, default=300, help="training scenes per domain (the demo's)")
    p.add_argument("--n_test", type=int, default=20)
    p.add_argument("--fid_weights", default=None, help="FID/KID with a local Inception weights file")
    main(p.parse_args())
