"""Benchmark (not a test): a photo translated whole and in tiles (translation.translate_tiled) by the paper's
9-block generator in float32 on the CPU: seconds and peak memory of each, in child processes of their own.

    python bench/bench_tiles.py                              # 1600x1200 and 4000x3000, tiles of 512 px
    python bench/bench_tiles.py --sizes 1600x1200 --tile 256
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
import models, translation

def high_water():  # peak RSS in MiB of this process (VmHWM: not inherited from the parent, unlike ru_maxrss)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

torch.manual_seed(0)
G = models.Generator(3, 3, 9).apply(models.weights_init_normal).eval()
x = torch.rand(1, 3, {h}, {w}) * 2 - 1
base = high_water()
start = time.perf_counter()
y = translation.translate(G, x, tile={tile})
seconds = time.perf_counter() - start
print(seconds, high_water() - base, base)
"""


def measure(w, h, tile):
    """(seconds, MiB of peak memory above the loaded generator and input, MiB before) of one translation."""
    code = CHILD.format(root=str(ROOT), h=h, w=w, tile=tile)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        return None
    return tuple(float(v) for v in r.stdout.split()[-3:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["1600x1200", "4000x3000"], help="WIDTHxHEIGHT of each photo")
    p.add_argument("--tile", type=int, default=512, help="tile side in px")
    args = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, {len(os.sched_getaffinity(0))} cores; float32, 9 residual blocks, tiles of {args.tile}")
    print("| photo | whole: s | whole: peak MiB | tiled: s | tiled: peak MiB | tiled / whole time |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        w, h = (int(v) for v in size.split("x"))
        whole, tiled = measure(w, h, None), measure(w, h, args.tile)
        cells = [f"{whole[0]:.1f} | {whole[1]:.0f}" if whole else "failed | failed", f"{tiled[0]:.1f} | {tiled[1]:.0f}"]
        ratio = f"{tiled[0] / whole[0]:.2f}" if whole else "n/a"
        print(f"| {w}x{h} | {cells[0]} | {cells[1]} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
