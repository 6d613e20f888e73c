"""Benchmark (not a test): our training step against the seed's, in one process on the same inputs; and whole runs.

    python bench/bench_step.py --size 256 --cuda         # ms/step, img/s, peak memory, warm-up: seed vs ours
    python bench/bench_step.py --size 128                # the same on the CPU (no CUDA graph there)
    python bench/bench_step.py --size 128 --only scales --d_scales 1 2 3   # multi-scale discriminators' cost
    python bench/bench_step.py runs --size 128 --steps 8 # whole runs on 8 demo scenes: the seed's loop vs train.py

The seed-style step is aitorzip/PyTorch-CycleGAN's algorithm: six generator calls, the discriminators' gradients
computed (and thrown away) in the generator update, patch maps average-pooled to one score, three plain Adams,
float32, eager. "ours" is train.py's train_step as main() sets it up.
"""

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from datasets import make_demo  # noqa: E402
from models import Discriminator, Generator, weights_init_normal  # noqa: E402
from runtime import amp_dtype  # noqa: E402
from utils import ReplayBuffer  # noqa: E402


def make_nets(device, n_blocks=9):
    torch.manual_seed(0)
    nets = [Generator(3, 3, n_blocks), Generator(3, 3, n_blocks), Discriminator(3), Discriminator(3)]
    for net in nets:
        net.apply(weights_init_normal)
        net.to(device)
    return nets


def seed_step(nets, optimizers, buffers, real_A, real_B):
    """One step as the seed computes it."""
    G_A2B, G_B2A, D_A, D_B = nets
    optimizer_G, optimizer_D_A, optimizer_D_B = optimizers
    fake_A_buffer, fake_B_buffer = buffers

    def score(D, x):  # the seed's discriminator: the patch map average-pooled, (B, 1)
        y = D(x)
        return F.avg_pool2d(y, y.shape[2:]).view(y.shape[0], -1)

    ones = torch.ones(len(real_A), 1, device=real_A.device)
    optimizer_G.zero_grad()
    loss_identity = 5.0 * (F.l1_loss(G_A2B(real_B), real_B) + F.l1_loss(G_B2A(real_A), real_A))
    fake_B, fake_A = G_A2B(real_A), G_B2A(real_B)
    loss_GAN = F.mse_loss(score(D_B, fake_B), ones) + F.mse_loss(score(D_A, fake_A), ones)
    loss_cycle = 10.0 * (F.l1_loss(G_B2A(fake_B), real_A) + F.l1_loss(G_A2B(fake_A), real_B))
    (loss_identity + loss_GAN + loss_cycle).backward()
    optimizer_G.step()
    for D, optimizer, real, fake, buffer in (
        (D_A, optimizer_D_A, real_A, fake_A, fake_A_buffer),
        (D_B, optimizer_D_B, real_B, fake_B, fake_B_buffer),
    ):
        optimizer.zero_grad()
        fake = buffer.push_and_pop(fake, buffer.draw(len(fake)).to(fake.device))
        loss_D = 0.5 * (F.mse_loss(score(D, real), ones) + F.mse_loss(score(D, fake.detach()), 0 * ones))
        loss_D.backward()
        optimizer.step()


def setups(device, args):
    """(name, step function of (real_A, real_B), memory format) for each variant timed."""

    def seed():
        nets = make_nets(device, args.n_blocks)
        adam = functools.partial(torch.optim.Adam, lr=2e-4, betas=(0.5, 0.999))
        optimizers = (
            adam([*nets[0].parameters(), *nets[1].parameters()]),
            adam(nets[2].parameters()),
            adam(nets[3].parameters()),
        )
        buffers = ReplayBuffer(50, 0), ReplayBuffer(50, 1)
        return functools.partial(seed_step, nets, optimizers, buffers)

    def ours(amp, capture, layout=None, pinned=True, scales=1):
        """train.py's step as main() builds it (train.build), in another layout or with pageable draws if asked."""
        flags = ["--seed", "0", "--n_blocks", str(args.n_blocks), "--d_scales", str(scales)] + ["--amp"] * amp
        run_args = train.get_parser().parse_args(flags)
        run = train.build(run_args, device)
        if layout is not None:  # in place: the optimizers keep the same parameters, their state is made lazily
            run.memory_format = layout
            for net in run.nets.values():
                net.to(memory_format=layout)
        step = train.make_step(run, run_args)
        step = train.CudaGraphStep(step) if capture else step

        def call(real_A, real_B):
            if pinned:
                return step(*train.to_device({"A": real_A, "B": real_B}, run.buffers, device, run.memory_format))
            real_A, real_B = (x.to(device, memory_format=run.memory_format) for x in (real_A, real_B))
            return step(real_A, real_B, *(b.draw(len(real_A)).to(device, non_blocking=True) for b in run.buffers))

        return call

    cuda = device.type == "cuda"
    variants = [
        ("seed-style, fp32 eager", seed, False),
        ("ours, fp32", functools.partial(ours, False, False), True),
        ("ours, --amp", functools.partial(ours, True, False), True),
    ]
    if cuda:
        variants += [
            ("ours, fp32, CUDA graph", functools.partial(ours, False, True), True),
            (
                "ours, --amp, CUDA graph (train.py --cuda --amp: channels_last, pinned draws)",
                functools.partial(ours, True, True),
                True,
            ),
            (
                "ours, --amp, CUDA graph, contiguous networks and buffers",
                functools.partial(ours, True, True, torch.contiguous_format),
                True,
            ),
            ("ours, --amp, eager, channels_last", functools.partial(ours, True, False), True),
            ("ours, --amp, eager, contiguous", functools.partial(ours, True, False, torch.contiguous_format), True),
            ("ours, --amp, eager, pageable draws", functools.partial(ours, True, False, pinned=False), True),
        ]
    if not cuda and amp_dtype(device) is None:
        variants = [v for v in variants if "--amp" not in v[0]]
        print("(this CPU has no bfloat16 units: --amp trains in float32, so it is not timed separately)")
    variants += [
        (f"ours, fp32, --d_scales {k}", functools.partial(ours, False, cuda, scales=k), True) for k in args.d_scales
    ]
    if args.only:
        variants = [v for v in variants if v[0] == variants[0][0] or any(w in v[0] for w in args.only.split(","))]
    return variants


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(args, device):
    g = torch.Generator().manual_seed(1)
    real_A = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1).to(device)
    real_B = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1).to(device)
    rows = []
    for name, make, benchmark in setups(device, args):
        torch.backends.cudnn.benchmark = benchmark  # the seed never set it
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step = make()
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step(real_A, real_B)
        sync(device)
        warmup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(real_A, real_B)
        sync(device)
        ms = (time.perf_counter() - t0) / args.steps * 1000
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append((name, ms, args.batch / ms * 1000, peak, warmup))
        print(f"  {name}: {ms:.1f} ms/step", flush=True)
        del step
    base = rows[0][1]
    print(
        f"\n{device_name(device)}, {args.size} px, batch {args.batch}, {args.steps} steps after {args.warmup} warm-up"
    )
    print("| step | ms/step | img/s | peak GiB | warm-up s | vs seed |\n|---|---|---|---|---|---|")
    for name, ms, ips, peak, warmup in rows:
        print(f"| {name} | {ms:.1f} | {ips:.1f} | {peak:.2f} | {warmup:.1f} | {base / ms:.2f}x |")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "CPU"
    )
    return f"{model}, {torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()})"


# ---- whole runs: the seed's training loop (data loading and saving included) against train.py ----


def seed_run(args):
    """The seed's train.py for one epoch: its data pipeline and loop, no visdom; saves its four files at the end."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset

    class SeedData(Dataset):
        def __init__(self, root):
            self.files_A = sorted((Path(root) / "train" / "A").glob("*.*"))
            self.files_B = sorted((Path(root) / "train" / "B").glob("*.*"))
            self.transform = T.Compose(
                [
                    T.Resize(int(args.size * 1.12), T.InterpolationMode.BICUBIC),
                    T.RandomCrop(args.size),
                    T.RandomHorizontalFlip(),
                    T.ToTensor(),
                    T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                ]
            )

        def __len__(self):
            return max(len(self.files_A), len(self.files_B))

        def __getitem__(self, i):
            b = self.files_B[np.random.randint(len(self.files_B))]
            return {
                "A": self.transform(Image.open(self.files_A[i % len(self.files_A)]).convert("RGB")),
                "B": self.transform(Image.open(b).convert("RGB")),
            }

    device = torch.device("cuda" if args.cuda else "cpu")
    nets = make_nets(device)
    adam = functools.partial(torch.optim.Adam, lr=2e-4, betas=(0.5, 0.999))
    optimizers = (
        adam([*nets[0].parameters(), *nets[1].parameters()]),
        adam(nets[2].parameters()),
        adam(nets[3].parameters()),
    )
    buffers = ReplayBuffer(50, 0), ReplayBuffer(50, 1)
    loader = DataLoader(SeedData(args.dataroot), batch_size=1, shuffle=True, num_workers=args.n_cpu)
    for batch in loader:
        seed_step(nets, optimizers, buffers, batch["A"].to(device), batch["B"].to(device))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for net, name in zip(nets, ("netG_A2B", "netG_B2A", "netD_A", "netD_B")):
        torch.save(net.state_dict(), out / f"{name}.pth")


def timed(cmd):
    """(wall seconds, peak RSS in MiB) of one command, from its own rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def time_runs(args):
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"  # the demo's scenes, with a test split: train.py draws its sample sheets
        make_demo(data, size=int(args.size * 1.12) + 1, n_train=args.steps, n_test=args.steps)
        common = ["--size", str(args.size), "--n_cpu", str(args.n_cpu)] + ["--cuda"] * args.cuda
        runs = {
            "seed's train loop (fp32)": lambda k: [
                sys.executable,
                __file__,
                "seed-run",
                "--dataroot",
                str(data),
                "--output_dir",
                f"{tmp}/seed{k}",
                *common,
            ],
            "train.py": lambda k: [
                sys.executable,
                str(ROOT / "train.py"),
                "--dataroot",
                str(data),
                "--output_dir",
                f"{tmp}/ours{k}",
                "--n_epochs",
                "1",
                "--decay_epoch",
                "0",
                "--seed",
                "0",
                "--no_visdom",
                *common,
            ],
            "train.py --amp": lambda k: [*runs["train.py"](f"amp{k}"), "--amp"],
        }
        results = {name: [] for name in runs}
        for k in range(args.repeats):  # interleaved, so drifts in machine load hit every variant alike
            for name, cmd in runs.items():
                results[name].append(timed(cmd(k)))
                print(f"  {name}: {results[name][-1][0]:.1f} s, {results[name][-1][1]:.0f} MiB", flush=True)
    base = statistics.median(w for w, _ in results["seed's train loop (fp32)"])
    print(
        f"\n{device_name(torch.device('cuda' if args.cuda else 'cpu'))}: whole runs of {args.steps} steps at "
        f"{args.size} px (start-up, loading and saving included), median of {args.repeats}"
    )
    print("| run | wall s | vs seed | peak RSS MiB |\n|---|---|---|---|")
    for name, rs in results.items():
        wall = statistics.median(w for w, _ in rs)
        print(f"| {name} | {wall:.1f} | {base / wall:.2f}x | {max(r for _, r in rs):.0f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="step", choices=["step", "runs", "seed-run"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--n_blocks", type=int, default=9, help="residual blocks per generator (the seed's step has 9)")
    p.add_argument(
        "--only",
        help="step mode: time the seed-style step and the variants whose names hold one of "
        "these comma-separated words (e.g. 'graph,contiguous')",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps (step mode: 50 on CUDA, 3 on CPU), or steps per run"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (10 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="runs mode: runs of each kind")
    p.add_argument(
        "--d_scales",
        type=int,
        nargs="*",
        default=[],
        help="step mode: also ours with these numbers of discriminator scales (e.g. 2 3)",
    )
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--n_cpu", type=int, default=0, help="loader workers in runs mode")
    p.add_argument("--dataroot")
    p.add_argument("--output_dir")
    args = p.parse_args()
    device = torch.device("cuda" if args.cuda else "cpu")
    if args.mode == "seed-run":
        seed_run(args)
    elif args.mode == "runs":
        args.steps = args.steps or 8
        time_runs(args)
    else:
        args.steps = args.steps or (50 if args.cuda else 3)
        args.warmup = args.warmup if args.warmup is not None else (10 if args.cuda else 1)
        time_steps(args, device)
