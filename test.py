"""Translate the test images of both domains with trained generators.

    python test.py                                   # output/netG_*.pth on datasets/summer2winter_yosemite
    python test.py --dataroot datasets/demo          # also prints PSNR when test/truth_B exists

Every image keeps its own size: test/A/x.jpg -> output/B/x.png, test/B/y.jpg -> output/A/y.png.
(Run it as a script; this file shadows Python's stdlib `test` package.)
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_pil_image

from datasets import ImageFolder, domain_dir, list_images, load_image
from models import load_generator


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batchSize", type=int, default=1, help="images of equal size translated together")
    p.add_argument("--dataroot", type=str, default="datasets/summer2winter_yosemite/", help="root directory of the dataset")
    p.add_argument("--input_nc", type=int, default=3, help="number of channels of input data")
    p.add_argument("--output_nc", type=int, default=3, help="number of channels of output data")
    p.add_argument("--size", type=int, default=256, help="unused: images are translated at their own size (kept for the seed's scripts)")
    p.add_argument("--cuda", action="store_true", help="use GPU computation")
    p.add_argument("--n_cpu", type=int, default=8, help="number of cpu threads to use during batch generation")
    p.add_argument("--generator_A2B", type=str, default="output/netG_A2B.pth", help="A2B generator checkpoint file")
    p.add_argument("--generator_B2A", type=str, default="output/netG_B2A.pth", help="B2A generator checkpoint file")
    p.add_argument("--output_dir", type=str, default="output", help="translations go to OUTPUT_DIR/A and OUTPUT_DIR/B")
    return p


@torch.inference_mode()
def translate(G, x):
    """G at any size: reflect-pad H and W up to a multiple of 4 (two stride-2 layers), at least 8 (the residual
    blocks' reflection padding needs 2 px at 1/4 scale), then crop back."""
    h, w = x.shape[-2:]
    pad_h, pad_w = max(8, h + -h % 4) - h, max(8, w + -w % 4) - w
    mode = "reflect" if min(h, w) > max(pad_h, pad_w) else "replicate"  # reflect needs pad < size
    y = G(F.pad(x, (0, pad_w, 0, pad_h), mode=mode))
    return y[..., :h, :w]


def batches(loader, batch_size):
    """Group consecutive images of equal size into batches of up to batch_size: (images (B, C, H, W), stems)."""
    group = []
    for image, stem in loader:
        if group and (len(group) == batch_size or image.shape != group[0][0].shape):
            yield torch.stack([g[0] for g in group]), [g[1] for g in group]
            group = []
        group.append((image, stem))
    if group:
        yield torch.stack([g[0] for g in group]), [g[1] for g in group]


def psnr(a, b):
    """PSNR in dB of two uint8 arrays."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def main(args):
    if args.cuda and not torch.cuda.is_available():
        raise ValueError("--cuda was given but PyTorch sees no CUDA GPU; drop --cuda to run on the CPU")
    device = torch.device("cuda" if args.cuda else "cpu")
    G_A2B = load_generator(args.generator_A2B, args.input_nc, args.output_nc).to(device).eval()
    G_B2A = load_generator(args.generator_B2A, args.output_nc, args.input_nc).to(device).eval()
    out = Path(args.output_dir)
    for G, src, dst, nc in ((G_A2B, "A", "B", args.input_nc), (G_B2A, "B", "A", args.output_nc)):
        folder = ImageFolder(domain_dir(args.dataroot, "test", src), nc)
        loader = DataLoader(folder, batch_size=None, num_workers=min(args.n_cpu, len(folder)))
        (out / dst).mkdir(parents=True, exist_ok=True)
        for images, stems in batches(loader, args.batchSize):
            fakes = translate(G, images.to(device))
            for fake, stem in zip(fakes, stems):
                to_pil_image((fake.float().cpu().clamp(-1, 1) + 1) / 2).save(out / dst / f"{stem}.png")
        print(f"wrote {len(folder)} {src}->{dst} translations to {out / dst}")
    report_psnr(args, out)
    return 0


def report_psnr(args, out):
    """With ground truth in test/truth_B (the demo has it): PSNR of G_A2B(A) and of doing nothing (A itself)."""
    truth_dir = Path(args.dataroot) / "test" / "truth_B"
    if not truth_dir.is_dir():
        return
    sources = {p.stem: p for p in list_images(domain_dir(args.dataroot, "test", "A"))}
    ours, baseline = [], []
    for path in list_images(truth_dir):
        truth = np.asarray(load_image(path, args.output_nc))
        ours.append(psnr(np.asarray(load_image(out / "B" / f"{path.stem}.png", args.output_nc)), truth))
        baseline.append(psnr(np.asarray(load_image(sources[path.stem], args.input_nc)), truth))
    print(f"PSNR of G_A2B(test/A) against test/truth_B: {np.mean(ours):.2f} dB "
          f"(do-nothing baseline, test/A itself: {np.mean(baseline):.2f} dB)")


if __name__ == "__main__":
    try:
        sys.exit(main(get_parser().parse_args()))
    except ValueError as e:
        sys.exit(f"error: {e}")
