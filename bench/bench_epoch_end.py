"""Benchmark (not a test): what an epoch end costs next to the epoch's steps, in whole train.py runs.

    python bench/bench_epoch_end.py                 # the demo (README's quick start 2) and a 128 px run of 8 scenes
    python bench/bench_epoch_end.py --only 128      # one of them

Each run is train.py's main() in a process of its own, with EpochEnd's steps and train_epoch timed from outside:
the seconds of the imports, of the epochs' steps (the checkpoints written in them also alone), of each epoch-end step
(the seed's files, the sheet, the figures' submit), of the wait for the last redraw at the end, of the interpreter's
start and exit around main(); and the CPU seconds of one redraw (python figures.py on the finished run).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # name: (demo image side, train images per domain, test images per domain, train.py flags)
    "demo": (
        40,
        300,
        20,
        ["--size", "32", "--n_epochs", "2", "--decay_epoch", "1", "--lr", "0.0005", "--n_cpu", "0", "--seed", "1"],
    ),
    "128": (144, 8, 8, ["--size", "128", "--n_epochs", "1", "--decay_epoch", "0", "--n_cpu", "2", "--seed", "0"]),
}


def child(argv):
    """Run train.main(argv) with its epoch end timed; print one JSON line of seconds."""
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import epoch_end
    import train

    seconds = defaultdict(float, imports=time.perf_counter() - t0)

    def timed(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    for step in epoch_end.EpochEnd.STEPS:
        timed(epoch_end.EpochEnd, step, step)
    timed(epoch_end.EpochEnd, "close", "wait at the end")
    timed(train, "train_epoch", "steps")  # the checkpoints written in it too, also timed alone:
    timed(train, "save_checkpoint", "checkpoints")
    t0 = time.perf_counter()
    train.main(train.get_parser().parse_args(argv))
    seconds["whole run"] = time.perf_counter() - t0 + seconds["imports"]
    print(json.dumps(seconds))
    train.before_exit()  # as train.py's __main__ ends


def main(args):
    sys.path.insert(0, str(ROOT))
    from datasets import make_demo

    rows = []
    for name, (side, n_train, n_test, flags) in RUNS.items():
        if args.only and args.only != name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            make_demo(Path(tmp) / "data", size=side, n_train=n_train, n_test=n_test)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--dataroot",
                f"{tmp}/data",
                "--output_dir",
                f"{tmp}/out",
                "--no_visdom",
                *flags,
                *args.extra,
            ]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode:
                sys.exit(f"{name} failed:\n{r.stderr}")
            s = json.loads(r.stdout.strip().splitlines()[-1])
            s["start and exit"] = wall - s["whole run"]  # the interpreter's, outside main()
            (Path(tmp) / "out" / "plots" / ".drawn.json").unlink()  # every file drawn again, as at an epoch end
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, str(ROOT / "figures.py"), f"{tmp}/out", "--quiet"], check=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            s["redraw CPU"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            epochs = int(flags[flags.index("--n_epochs") + 1])
            rows.append((name, epochs, s))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\n{cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; seconds per run")
    print(
        "| run | epochs | imports | steps (checkpoints in them) | generators | sheets | evaluations | figures (submit) "
        "| wait at the end | one redraw, CPU | whole run | interpreter start and exit |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for name, epochs, s in rows:
        print(
            f"| {name} | {epochs} | {s['imports']:.1f} | {s['steps']:.1f} ({s['checkpoints']:.1f}) | "
            f"{s['generators']:.2f} | {s['sheet']:.2f} | {s['evaluation']:.2f} | {s['figures']:.3f} | "
            f"{s['wait at the end']:.2f} | {s['redraw CPU']:.2f} | {s['whole run']:.1f} | {s['start and exit']:.2f} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--only", choices=list(RUNS), help="one run only")
        args, extra = p.parse_known_args()
        args.extra = extra  # more train.py flags, e.g. --amp or --n_samples 0
        main(args)
