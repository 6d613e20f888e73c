"""Translate images with trained generators, and write a results page.

    python test.py                                           # OUTPUT_DIR/netG_*.pth on datasets/summer2winter_yosemite
    python test.py --dataroot datasets/demo --output_dir output/demo     # after train.py --output_dir output/demo
    python test.py --input photo.jpg --generator pretrained/horse2zebra.pth    # one image, or every image of a folder
    python test.py --input photos/ --generator output/netG_B2A.pth --direction BtoA
    python test.py --dataroot datasets/horse2zebra --generator_A2B pretrained/horse2zebra.pth \
        --generator_B2A pretrained/zebra2horse.pth --metrics           # + FID and KID against the real test images

Data-root mode: test/A/x.jpg -> OUTPUT_DIR/B/x.png through G_A2B and test/B/y.jpg -> OUTPUT_DIR/A/y.png through
G_B2A, with the cycle reconstructions in OUTPUT_DIR/rec_A/x.png and rec_B/y.png. --input mode: one generator, the
same names, no reconstruction. Every image keeps its size; PNG copies of the sources go to OUTPUT_DIR/real_A (real_B),
and OUTPUT_DIR/index.html shows each source beside its results. Unreadable images are reported and skipped.
--metrics: FID and KID (metrics.py) of B/ against the real test/B and of A/ against test/A (--input mode: against
--reference FOLDER), on the PNGs as written; printed, in OUTPUT_DIR/metrics.json and at the top of index.html.
(Run it as a script; this file shadows Python's stdlib `test` package.)
"""

import argparse
import gc
import html
import json
import math
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import figures
from datasets import ImageFolder, domain_dir, fit_size, format_bad, list_images, load_image, output_names
from files import shown, write_atomic, write_png
from models import AttentionGenerator, load_generator
from runtime import (
    AUTO_TILE,
    BYTES_PER_PIXEL,
    TILED_BYTES_PER_PIXEL,
    chosen_device,
    free_pixels,
    loader_workers,
    precision,
)
from translation import padded_size, translate
from utils import UserError, cannot_write, channels_problem, first_line, to_uint8
from video import is_video, translate_clip


def get_parser():
    """test.py's flags, in the groups that --help shows them in."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_flags(p.add_argument_group("what to translate, with which generators"))
    add_output_flags(p.add_argument_group("what is written"))
    add_compute_flags(p.add_argument_group("where and how it computes"))
    add_metrics_flags(p.add_argument_group("FID and KID"))
    return p


def add_source_flags(g):
    """Data-root mode (test/A, test/B) or --input files, and the generators."""
    g.add_argument("--dataroot", default="datasets/summer2winter_yosemite/", help="root directory of the dataset")
    g.add_argument(
        "--input",
        help="translate this image or video (mp4, mov, mkv, webm, avi), or all of a folder, instead of DATAROOT/test",
    )
    g.add_argument(
        "--direction",
        choices=["AtoB", "BtoA"],
        help="with --input: the images are domain A (AtoB, the default) or B",
    )
    g.add_argument(
        "--generator",
        help="with --input: the generator to use (default: the --direction's --generator_A2B/B2A)",
    )
    g.add_argument(
        "--generator_A2B",
        help="A2B generator checkpoint file (default: OUTPUT_DIR/netG_A2B.pth)",
    )
    g.add_argument(
        "--generator_B2A",
        help="B2A generator checkpoint file (default: OUTPUT_DIR/netG_B2A.pth)",
    )
    g.add_argument("--input_nc", type=int, default=3, help="number of channels of input data")
    g.add_argument("--output_nc", type=int, default=3, help="number of channels of output data")
    g.add_argument(
        "--size",
        type=int,
        default=256,
        help="unused: images are translated at their own size (kept for the seed's scripts)",
    )


def add_output_flags(g):
    """Where results go, how large images are handled, masks, videos."""
    g.add_argument("--output_dir", default="output", help="translations go to OUTPUT_DIR/A and OUTPUT_DIR/B")
    g.add_argument(
        "--max_size",
        type=int,
        help="scale images whose longer side is over MAX_SIZE px "
        "down to it (default: translate every image at its "
        "own size, skipping any that would not fit in memory)",
    )
    g.add_argument(
        "--tile",
        type=int,
        metavar="N",
        help="translate each image in tiles of N px: the same result in less memory, for photos larger than memory "
        "(default: only images that would not fit whole)",
    )
    g.add_argument(
        "--mask_dir",
        metavar="DIR",
        help="translate only where a mask says: "
        "DIR/NAME.* per input image (grey: white translates, black keeps, grey blends)",
    )
    g.add_argument(
        "--shared_frames",
        type=int,
        default=8,
        metavar="K",
        help="videos: the InstanceNorm statistics every frame uses, from K frames spread through the clip",
    )
    g.add_argument(
        "--frame_stats",
        action="store_true",
        help="videos: each frame normalised by its own statistics, as frame-by-frame tools do (flickers)",
    )


def add_compute_flags(g):
    """Device, data loading and batches."""
    g.add_argument("--device", help="where to translate: cpu, cuda, cuda:N or mps (default: cpu)")
    g.add_argument("--cuda", action="store_true", help="use GPU computation (the seed's flag: --device cuda)")
    g.add_argument("--n_cpu", type=int, default=8, help="number of cpu threads to use during batch generation")
    g.add_argument("--batchSize", type=int, default=1, help="images of equal size translated together")


def add_metrics_flags(g):
    """--metrics and what it compares with."""
    g.add_argument(
        "--metrics",
        action="store_true",
        help="after translating: FID and KID against the real images "
        "of the target domain, into OUTPUT_DIR/metrics.json",
    )
    g.add_argument(
        "--reference",
        metavar="FOLDER",
        help="with --input --metrics: the folder of real images (png/jpg/jpeg) to compare with",
    )
    g.add_argument(
        "--fid_weights",
        metavar="PATH",
        help="with --metrics: a local Inception weights file (default: fetched once into torch.hub's cache)",
    )


def memory_check(pixels, max_size):
    """too_big for ImageFolder: why an image (width, height) cannot be translated in `pixels` padded pixels, even in
    tiles (which need TILED_BYTES_PER_PIXEL a pixel, not BYTES_PER_PIXEL)."""

    def reason(w, h):
        if max_size:
            w, h = fit_size(w, h, max_size)
        need = math.prod(padded_size(h, w)) * TILED_BYTES_PER_PIXEL // BYTES_PER_PIXEL
        if need <= pixels:
            return None
        hint = "a smaller --max_size" if max_size else "--max_size N to scale its longer side down to N px"
        return (
            f"{w}x{h} px: translating it needs about {need * BYTES_PER_PIXEL / 1e9:.1f} GB of memory even in tiles, "
            f"{pixels * BYTES_PER_PIXEL / 1e9:.1f} GB are free; pass {hint}"
        )

    return reason


def batches(loader, batch_size, bad, max_pixels):
    """Group consecutive images of equal size into batches of up to batch_size, and up to max_pixels padded pixels
    in all: (images (B, C, H, W), indices). Images that fail to decode are reported, appended to `bad` as
    (path, reason) and left out."""
    group = []
    for image, i, error in loader:
        if error:
            print(f"skipped {shown(loader.dataset.files[i])}: {error}", file=sys.stderr)
            bad.append((loader.dataset.files[i], error))
            continue
        full = len(group) == batch_size or (len(group) + 1) * math.prod(padded_size(*image.shape[-2:])) > max_pixels
        if group and (full or image.shape != group[0][0].shape):
            yield torch.stack([g[0] for g in group]), [g[1] for g in group]
            group = []
        group.append((image, i))
    if group:
        yield torch.stack([g[0] for g in group]), [g[1] for g in group]


def translate_videos(videos, G, nc, folder, args, device, rows, skipped):
    """Each clip of --input through G into folder/NAME.ext (video.translate_clip), its first frame beside it as
    NAME.poster.png; a row per clip appended to rows, a clip that cannot be read to skipped."""
    for source, name in zip(videos, output_names(videos)):
        target = folder / f"{name}{source.suffix.lower()}"
        try:
            poster = translate_clip(G, source, target, device, nc, args.shared_frames, args.frame_stats)
            write_png(poster, folder / f"{name}.poster.png")
        except (ValueError, OSError) as e:
            print(f"skipped {shown(source)}: {e}", file=sys.stderr)
            skipped.append((source, str(e)))
            continue
        rows.append((shown(source.name), [f"{folder.name}/{target.name}"]))
        print(f"wrote {shown(target)}")


def tile_size(tile, images, pixels, source):
    """--tile, or AUTO_TILE for an image that does not fit whole in `pixels` padded pixels (one line says so)."""
    h, w = images.shape[-2:]
    if tile is None and math.prod(padded_size(h, w)) > pixels:
        tile = AUTO_TILE
        print(
            f"{shown(source.name)}: {w}x{h} px does not fit whole in the free memory: translated in tiles of {tile} px"
        )
    return tile


def psnr(a, b):
    """PSNR in dB of two uint8 arrays."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def generator(path, input_nc, output_nc, device):
    """load_generator, on `device` and ready for inference; channels_last (cuDNN's fast layout) off the CPU."""
    G = load_generator(path, input_nc, output_nc)  # built and loaded on the CPU
    return G.to(device, memory_format=precision(device)[0]).eval()


class Masks:
    """--mask_dir: a mask per input image (the same file stem, any image format), read as grey levels: white
    translates, black keeps, grey blends. The translation written is m * G(x) + (1 - m) * x in 8-bit, so it is the
    input's decoded pixels exactly where m = 0 and what test.py writes without masks where m = 1."""

    def __init__(self, folder, input_nc, output_nc):
        if not Path(folder).is_dir():
            raise ValueError(f"--mask_dir {shown(folder)} is not a folder: pass a folder of masks named as the images")
        if input_nc != output_nc:
            raise ValueError("--mask_dir blends the translation with its input, so it needs --input_nc == --output_nc")
        self.files = {p.stem: p for p in reversed(list_images(folder))}  # x.png before x.jpg: the first name wins
        self.resized = False

    def apply(self, source, real, fake):
        """[the blend, the mask as used (1, H, W)] for uint8 (C, H, W) real and fake; a missing or unreadable mask
        says so in one line, and the image is translated whole."""
        h, w = real.shape[-2:]
        path = self.files.get(source.stem)
        try:
            mask = load_image(path, 1) if path is not None else None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for a damaged file
            print(
                f"{shown(source)}: mask {shown(path.name)} cannot be read ({first_line(e)}); translated whole",
                file=sys.stderr,
            )
            mask = None
        if mask is None:
            if path is None:
                print(
                    f"{shown(source)}: no mask named {shown(source.stem)}.* in --mask_dir; translated whole",
                    file=sys.stderr,
                )
            return [fake, torch.full((1, h, w), 255, dtype=torch.uint8)]
        if mask.size != (w, h):
            if not self.resized:
                print(
                    f"masks of another size than their image are resized to it (the first: {shown(path.name)}, "
                    f"{mask.size[0]}x{mask.size[1]} to {w}x{h})",
                    file=sys.stderr,
                )
            # BOX: area average down (exact at whole factors), nearest up: black stays black, no bilinear grey edge
            self.resized, mask = True, mask.resize((w, h), Image.BOX)
        m = torch.from_numpy(np.array(mask))[None]  # (1, H, W) uint8
        weight = m.double() / 255  # exactly 0 and 1 at black and white: the blend is then real or fake exactly
        blend = (weight * fake.double() + (1 - weight) * real.double()).round().to(torch.uint8)
        return [blend, m]


@torch.inference_mode()
def translate_batch(G, G_back, images, device, layout, autocast, tile=None):
    """images (B, C, H, W) from the loader -> [real, G(real)], then an attention generator's map (white: translated)
    and, with G_back, G_back(G(real)): uint8 on `device` (8 bits before the copy back: a quarter of the bytes).
    tile: in tiles of that many px (translation.translate_tiled: the same numbers, less memory)."""
    real = images.to(device, memory_format=layout, non_blocking=True)
    with autocast:
        fake, attention = translate(G, real, attention=True, tile=tile, progress=tile is not None)
        results = (
            [real, fake]
            + ([] if attention is None else [attention * 2 - 1])
            + ([] if G_back is None else [translate(G_back, fake, tile=tile)])
        )
    return [to_uint8(r.float()) for r in results]


def jobs_of(args, device):
    """What to translate: [(source domain, files, channels, generator, its path, reverse generator or None)]."""
    out = Path(args.output_dir)
    if args.input is None:
        if args.generator or args.direction:
            raise ValueError(
                "--generator and --direction go with --input; in data-root mode use --generator_A2B "
                "and --generator_B2A (default: OUTPUT_DIR/netG_A2B.pth and netG_B2A.pth)"
            )
        paths = (args.generator_A2B or out / "netG_A2B.pth", args.generator_B2A or out / "netG_B2A.pth")
        G_A2B = generator(paths[0], args.input_nc, args.output_nc, device)
        G_B2A = generator(paths[1], args.output_nc, args.input_nc, device)
        return [
            ("A", list_images(domain_dir(args.dataroot, "test", "A")), args.input_nc, G_A2B, paths[0], G_B2A),
            ("B", list_images(domain_dir(args.dataroot, "test", "B")), args.output_nc, G_B2A, paths[1], G_A2B),
        ]
    source = Path(args.input)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if is_video(p) and p.is_file())  # clips
        try:
            files = list_images(source) + files
        except ValueError:  # no image in the folder: an error unless it has clips
            if not files:
                raise
    elif source.is_file():
        files = [source]  # named by the user: any extension, PIL decides
    else:
        raise ValueError(f"--input {source} does not exist: pass an image file or a folder of images")
    if args.direction == "BtoA":
        path = args.generator or args.generator_B2A or out / "netG_B2A.pth"
        return [("B", files, args.output_nc, generator(path, args.output_nc, args.input_nc, device), path, None)]
    path = args.generator or args.generator_A2B or out / "netG_A2B.pth"
    return [("A", files, args.input_nc, generator(path, args.input_nc, args.output_nc, device), path, None)]


def outputs(src, dst, G, G_back, masks):
    """(folder, page column) of each picture written per image: the source's copy, its translation (masked), the
    mask, the attention map, the reconstruction."""
    G_name, G_back_name = ("G_A2B", "G_B2A") if src == "A" else ("G_B2A", "G_A2B")
    found = [(f"real_{src}", f"x ({src})"), (dst, f"{G_name}(x)")]
    if masks:
        found.append((f"mask_{src}", "mask"))
    if isinstance(G, AttentionGenerator):
        found.append((f"attention_{dst}", f"{G_name}'s attention"))
    if G_back is not None:
        found.append((f"rec_{src}", f"{G_back_name}({G_name}(x))"))
    return found


def checked_device(args):
    """The device to translate on, once every flag is known to work (ValueError, one line, naming the first that
    does not)."""
    try:
        device = chosen_device(args)
    except UserError as e:
        raise ValueError(e) from None
    for flag, low in (("batchSize", 1), ("n_cpu", 0), ("max_size", 1), ("tile", 4), ("shared_frames", 1)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise ValueError(f"--{flag} {value}: must be at least {low}")
    for problem in (channels_problem(args), metrics_problem(args)):
        if problem:
            raise ValueError(problem)
    return device


def main(args):
    device = checked_device(args)
    masks = Masks(args.mask_dir, args.input_nc, args.output_nc) if args.mask_dir is not None else None
    layout, autocast = precision(device)
    out = Path(args.output_dir)
    jobs = jobs_of(args, device)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(cannot_write(out, e)) from None
    pixels = free_pixels(device)  # what one batch may hold, padded
    sections, clips, skipped, written_A = [], [], [], {}
    try:  # the page and the summary are written whatever happens
        for src, files, nc, G, G_path, G_back in jobs:
            dst = "B" if src == "A" else "A"
            videos = [f for f in files if is_video(f)]
            files = [f for f in files if not is_video(f)]
            folder = ImageFolder(files, nc, memory_check(pixels, args.max_size), args.max_size)
            skipped += folder.skipped
            for path, reason in folder.skipped:
                print(f"skipped {shown(path)}: {reason}", file=sys.stderr)
            loader = DataLoader(
                folder,
                batch_size=None,
                num_workers=loader_workers(args.n_cpu, len(folder)),
                pin_memory=device.type == "cuda",
            )
            folders, columns = zip(*outputs(src, dst, G, G_back, masks))
            for d in folders:
                (out / d).mkdir(exist_ok=True)
            rows = []
            for images, indices in batches(loader, args.batchSize, skipped, pixels):
                tile = tile_size(args.tile, images, pixels, folder.files[indices[0]])
                results = [r.cpu() for r in translate_batch(G, G_back, images, device, layout, autocast, tile)]
                for k, i in enumerate(indices):
                    name, source = folder.names[i], folder.files[i]
                    pictures = [r[k] for r in results]
                    if masks:  # the translation as m * G(x) + (1 - m) * x, and the mask itself beside it
                        pictures[1:2] = masks.apply(source, pictures[0], pictures[1])
                    try:
                        for d, r in zip(folders, pictures):
                            write_png(r, out / d / f"{name}.png")
                    except OSError as e:  # a full disk, a name the file system refuses, ...
                        print(f"skipped {shown(source)}: cannot write its results ({e})", file=sys.stderr)
                        skipped.append((source, f"cannot write its results ({e.strerror or e})"))
                        continue
                    rows.append((shown(source.name), [f"{d}/{name}.png" for d in folders]))
                    if src == "A":
                        written_A[name] = source
            G_name = "G_A2B" if src == "A" else "G_B2A"
            sections.append((f"{src} → {dst}: {G_name} = {shown(G_path)}", columns, rows))
            if videos:
                clips.append((f"{src} → {dst} videos: {G_name}", [f"{G_name}(x)"], []))
                translate_videos(videos, G, nc, out / dst, args, device, clips[-1][2], skipped)
            print(
                f"wrote {len(rows)} {src}->{dst} translations to {out / dst}"
                + (f", reconstructions to {out / folders[-1]}" if G_back is not None else "")
            )
    finally:
        sections += clips  # after the image sections, which --metrics pairs with the jobs
        write_index(out / "index.html", sections, skipped)
        link_training_page(out)
        if skipped:
            print(f"skipped {len(skipped)} image(s):\n" + format_bad(skipped))
    if not any(section[2] for section in sections):
        raise ValueError("no image could be read, nothing was translated")
    print(f"results page: {out / 'index.html'}")
    if args.input is None:
        report_psnr(args, out, written_A)
    if args.metrics:
        report_metrics(args, out, jobs, sections, skipped, device)
    return 0


PAGE_STYLE = (
    "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
    "th,td{padding:4px 8px;text-align:center;vertical-align:middle;border-bottom:1px solid #ddd}"
    "td.name{text-align:left;max-width:16em;overflow-wrap:anywhere}"
    "img,video{display:block;min-width:128px;max-width:min(30vw,512px);height:auto}"
)


def link_training_page(out):
    """In a run's folder, train.py's training.html written again (the page only), now with its link to index.html."""
    if (out / "training.html").is_file() and (out / "losses.csv").is_file():
        try:
            figures.draw(out, plots=False)
        except Exception as e:  # the results are written; a page that cannot be is one line
            print(f"warning: training.html not updated ({first_line(e)})", file=sys.stderr)


def write_index(path, sections, skipped, scores=None):
    """The results page: FID/KID first (with --metrics), then one table per direction, a row per source image with its
    PNG copy and results side by side. Relative links and inline CSS only, so it opens from disk, and keeps working
    when the folder is moved."""
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>CycleGAN results</title>'
        f"<style>{PAGE_STYLE}</style></head><body>\n<h1>CycleGAN results</h1>"
    ]
    if (path.parent / "training.html").exists():  # train.py's page of the same run: curves, samples per epoch
        parts.append('<p><a href="training.html">training page</a>: loss curves, FID/KID, samples per epoch</p>')
    if scores:
        parts.append(scores_html(scores))
    for title, columns, rows in sections:
        parts.append(
            f"<h2>{html.escape(title)}</h2>\n<table><tr><th>file</th>"
            + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
            + "</tr>"
        )
        for name, images in rows:
            cells = "".join(cell(src) for src in images)
            parts.append(f'<tr><td class="name">{html.escape(name)}</td>{cells}</tr>')
        parts.append("</table>")
    if skipped:
        parts.append(
            "<h2>Skipped</h2>\n<ul>"
            + "".join(f"<li>{html.escape(shown(p))}: {html.escape(r)}</li>" for p, r in skipped)
            + "</ul>"
        )
    parts.append("</body></html>\n")
    write_atomic(path, lambda f: f.write("\n".join(parts)), "w", encoding="utf-8")


def cell(src):
    """A results-page cell: the picture at the relative path src, linked; a clip plays, its poster frame first."""
    if is_video(src):
        poster = quote(str(Path(src).with_suffix(".poster.png")))
        return f'<td><video src="{quote(src)}" poster="{poster}" controls preload="none"></video></td>'
    return f'<td><a href="{quote(src)}"><img src="{quote(src)}" alt="{html.escape(src)}" loading="lazy"></a></td>'


def report_psnr(args, out, written_A):
    """With ground truth in test/truth_B (the demo has it): PSNR of G_A2B(A) and of doing nothing (A itself)."""
    truth_dir = Path(args.dataroot) / "test" / "truth_B"
    if not truth_dir.is_dir():
        return
    ours, baseline = [], []
    for path in list_images(truth_dir):
        if path.stem not in written_A:  # its source was unreadable
            continue
        truth = np.asarray(load_image(path, args.output_nc))
        ours.append(psnr(np.asarray(load_image(out / "B" / f"{path.stem}.png", args.output_nc)), truth))
        baseline.append(psnr(np.asarray(load_image(written_A[path.stem], args.input_nc)), truth))
    if ours:
        print(
            f"PSNR of G_A2B(test/A) against test/truth_B: {np.mean(ours):.2f} dB "
            f"(do-nothing baseline, test/A itself: {np.mean(baseline):.2f} dB)"
        )


def metrics_problem(args):
    """Why --metrics, --reference and --fid_weights cannot work as given, or None."""
    if not args.metrics and (args.reference or args.fid_weights):
        return "--reference and --fid_weights go with --metrics"
    if args.input is None and args.reference is not None:
        return "--reference goes with --input; in data-root mode the translations are compared with test/A and test/B"
    if args.metrics and args.input is not None and args.reference is None:
        return "--metrics with --input needs --reference FOLDER, a folder of real images of the target domain"
    if args.reference is not None and not Path(args.reference).is_dir():
        return f"--reference {shown(args.reference)} is not a folder: pass a folder of real images"
    if args.fid_weights is not None and not Path(args.fid_weights).is_file():
        import metrics  # here: importing torch-fidelity takes a second, and only --metrics needs it

        return (
            f"--fid_weights {shown(args.fid_weights)} does not exist: pass the Inception weights file "
            f"({metrics.hub_file().name})"
        )
    return None


def report_metrics(args, out, jobs, sections, skipped, device):
    """--metrics: FID and KID of each direction's translations (the PNGs as written) against the real images of its
    target domain (their PNG copies in real_A/ real_B/, or --reference), printed as a table, written with the
    protocol to OUTPUT_DIR/metrics.json, and put at the top of index.html."""
    import metrics  # here: importing torch-fidelity takes a second, and only --metrics needs it

    written = {job[0]: (job[4], rows) for job, (_, _, rows) in zip(jobs, sections)}  # source domain -> (G, rows)
    scores = {}
    for src, (G_path, rows) in written.items():
        dst = "B" if src == "A" else "A"
        if args.reference is not None:
            real, real_name = args.reference, shown(args.reference)
        else:  # the copies of test/dst: decoded as the generators saw them, only those that could be read
            real, real_name = [out / paths[0] for _, paths in written[dst][1]], f"test/{dst} (as real_{dst}/)"
        result = metrics.evaluate(
            [out / paths[1] for _, paths in rows], real, cuda=device.type == "cuda", weights=args.fid_weights
        )
        result["kid_std"] = None if math.isnan(result["kid_std"]) else result["kid_std"]  # JSON has no NaN
        scores[f"{src}2{dst}"] = {"generator": shown(G_path), "translated": f"{dst}/", "against": real_name, **result}
    scores = {"protocol": metrics.protocol(weights=args.fid_weights), **scores}
    write_atomic(out / "metrics.json", lambda f: json.dump(scores, f, indent=2), "w", encoding="utf-8")
    weights = scores["protocol"]["weights"]
    print(
        f"FID and KID ({scores['protocol']['library']} {scores['protocol']['version']}, "
        f"{scores['protocol']['feature_extractor']} features), in {out / 'metrics.json'}:"
    )
    print(
        "\n".join(
            "  ".join(f"{c:<{w}}" for c, w in zip(row, (9, 10, 28, 8, 9, 14))).rstrip()
            for row in [SCORE_COLUMNS] + score_rows(scores)
        )
    )
    if weights and weights.get("same_as_library") is False:
        print(
            f"note: {weights['file']} is not the Inception file torch-fidelity downloads (its sha256 differs): "
            f"these numbers do not compare with papers' tables"
        )
    write_index(out / "index.html", sections, skipped, scores)


SCORE_COLUMNS = ("direction", "translated", "against", "images", "FID", "KID ×100")


def score_rows(scores):
    """One row of text per direction of metrics.json: the SCORE_COLUMNS."""

    def kid(s):  # no std (None in metrics.json) when every subset was the whole of both sets
        return f"{100 * s['kid_mean']:.2f}" + (f" ± {100 * s['kid_std']:.2f}" if s["kid_std"] is not None else "")

    return [
        (d, s["translated"], s["against"], f"{s['fake']['count']} / {s['real']['count']}", f"{s['fid']:.2f}", kid(s))
        for d, s in scores.items()
        if d != "protocol"
    ]


def scores_html(scores):
    """The FID/KID table for the top of the page, with what was measured and a link to metrics.json."""
    p = scores["protocol"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in SCORE_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in score_rows(scores))
    weights = f", weights sha256 {p['weights']['sha256'][:12]}…" if p["weights"] else ""
    about = (
        f"{p['library']} {p['version']}, {p['feature_extractor']} features{weights}; KID: {p['kid']['subsets']} "
        f"subsets of {p['kid']['subset_size']} images, seed {p['kid']['seed']}; images: translated / real; "
        f"lower is better"
    )
    return (
        f"<h2>FID and KID</h2>\n<table><tr>{head}</tr>{body}</table>\n<p>{html.escape(about)} "
        f'(<a href="metrics.json">metrics.json</a>)</p>'
    )


if __name__ == "__main__":
    try:
        code = main(get_parser().parse_args())
    except (ValueError, OSError) as e:  # OSError: a full disk, a vanished folder; the results so far are on the page
        code = f"error: {e}"
    gc.freeze()  # no last collection over torch's objects at exit: most of a second on a small CPU
    sys.exit(code)
