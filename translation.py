"""A generator applied to images of any size: padded to what it needs (translate, translate_image), in tiles for
photos larger than memory, and with one set of statistics for all the frames of a clip (no normalisation flicker).

The tiles and the clips share one mechanism: the generator's InstanceNorm statistics gathered once, over the tiles
of an image or the sampled frames of a clip, and used for every tile or frame.

With its statistics fixed, the generator is local (each output pixel sees 87 px around it), so an image can be
translated tile by tile, exactly: the statistics of each norm are pooled over all tiles before any tile is
normalised by it. The full-resolution layers before the residual trunk and after it run tile by tile, each tile with
a halo of HALO px (the network's own padding at the image's true borders); the trunk runs whole at quarter
resolution, the one tensor held. Memory: one tile plus about 300 bytes a pixel, instead of about 1000.
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from models import AttentionGenerator, InstanceNorm, ResidualBlock, Stop, attend, blend
from utils import as_image, to_tensor, to_uint8

HALO = 16  # full-resolution px around a tile: more than the head's (6 px) and the tail's (11 px) reach


def padded_size(h, w):
    """H and W as translate() pads them: up to a multiple of 4, and at least 8."""
    return max(8, h + -h % 4), max(8, w + -w % 4)


def pad(x):
    """x reflect-padded at the bottom and right to padded_size (replicated where the image is too small to reflect)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (p - s for p, s in zip(padded_size(h, w), (h, w)))
    mode = "reflect" if min(h, w) > max(pad_h, pad_w) else "replicate"  # reflect needs pad < size
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


@torch.inference_mode()
def translate(G, x, attention=False, tile=None, progress=False):
    """G at any size: reflect-pad H and W up to a multiple of 4 (two stride-2 layers), at least 8 (the residual
    blocks' reflection padding needs 2 px at 1/4 scale), then crop back. attention=True: (G(x), its attention map
    or None), as attend(). tile: translate each image in tiles of about that many px (translate_tiled; progress: with
    a progress bar)."""
    h, w = x.shape[-2:]
    x = pad(x)
    if tile is None:
        y, a = attend(G, x)
    else:  # image by image: each its own statistics
        pairs = [translate_tiled(G, x[k : k + 1], tile, progress) for k in range(len(x))]
        y = torch.cat([p[0] for p in pairs])
        a = None if pairs[0][1] is None else torch.cat([p[1] for p in pairs])
    y, a = y[..., :h, :w], None if a is None else a[..., :h, :w]
    return (y, a) if attention else y


def translate_image(G, image, tile=None):
    """A PIL image (any mode) translated by G, a generator from load_generator, to a PIL image of the same size: the
    pixels test.py writes on the CPU (decoded as test.py decodes files, translated in float32 on G's device).
    tile: in tiles of about that many px, for images larger than memory (the same pixels, to float rounding)."""
    first = next(m for m in G.modules() if isinstance(m, nn.Conv2d))
    x = to_tensor(as_image(image, first.in_channels))[None].to(first.weight.device)
    y = to_uint8(translate(G.eval(), x, tile=tile)[0].float().cpu())  # (C, H, W) uint8
    return Image.fromarray(y[0].numpy() if len(y) == 1 else y.permute(1, 2, 0).numpy())


def split(G):
    """(head, trunk, tail) of a generator's layers: to quarter resolution, the residual blocks, back to full."""
    layers = list(G.model)
    first = next(i for i, m in enumerate(layers) if isinstance(m, ResidualBlock))
    last = max(i for i, m in enumerate(layers) if isinstance(m, ResidualBlock))
    return G.model[:first], G.model[first : last + 1], G.model[last + 1 :]


def norms(module):
    return [m for m in module.modules() if isinstance(m, InstanceNorm)]


def pooled(parts):
    """(mean, var) of the per-channel (count, sum, sum of squares) of many parts, as if they were one tensor."""
    n = sum(p[0] for p in parts)
    mean = sum(p[1] for p in parts) / n
    return mean, (sum(p[2] for p in parts) / n - mean.square()).clamp_min(0)


def collect(module, norm, x, window=None):
    """norm's (count, sum, sum of squares) of x through module, up to norm (the rest is not computed)."""
    norm.collect, norm.window = [], window
    try:
        module(x)
    except Stop:
        pass
    finally:
        found, norm.collect, norm.window = norm.collect, None, None
    return found[0]


def windows(h, w, tile):
    """Tiles of an (h, w) image, both multiples of 4: [(crop, core)], each a (y0, y1, x0, x1) box; the crop is the
    core and its halo, cut at the image's borders (multiples of 4, so the two stride-2 layers stay aligned)."""
    tile = max(4, tile - tile % 4)
    found = []
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            core = (y0, min(h, y0 + tile), x0, min(w, x0 + tile))
            crop = (max(0, y0 - HALO), min(h, core[1] + HALO), max(0, x0 - HALO), min(w, core[3] + HALO))
            found.append((crop, core))
    return found


def relative(crop, core):
    """core as a window of its crop: (y0, y1, x0, x1, the crop's height), full-resolution px."""
    return core[0] - crop[0], core[1] - crop[0], core[2] - crop[2], core[3] - crop[2], crop[1] - crop[0]


def cut(x, box, scale=1):
    return x[..., box[0] // scale : box[1] // scale, box[2] // scale : box[3] // scale]


def fix(module, parts_of):
    """Give each norm of module, in order, the statistics pooled over parts_of(norm) (its earlier norms fixed)."""
    for norm in norms(module):
        norm.stats = pooled(parts_of(norm))


def release(G):
    for norm in norms(G):
        norm.stats = norm.collect = norm.window = None


@torch.inference_mode()
def translate_tiled(G, x, tile, progress=False):
    """(G(x), its attention map or None) of a (1, C, H, W) image, H and W multiples of 4, computed in tiles of
    `tile` px (a multiple of 4): the same numbers as G(x), to float rounding. progress: a bar of the tiles' passes."""
    head, trunk, tail = split(G)
    boxes = windows(x.shape[-2], x.shape[-1], tile)
    passes = len(norms(head)) + len(norms(tail)) + 2
    bar = tqdm(total=passes * len(boxes), unit="tile", desc="tiles", leave=False, disable=not progress, file=sys.stderr)

    def tiles():
        for box in boxes:
            yield box
            bar.update()

    try:
        fix(head, lambda norm: [collect(head, norm, cut(x, crop), relative(crop, core)) for crop, core in tiles()])
        q = None  # the head's output at quarter resolution, assembled from the tiles' cores
        for crop, core in tiles():
            part = cut(head(cut(x, crop)), relative(crop, core), 4)
            if q is None:
                q = part.new_empty(*part.shape[:2], x.shape[-2] // 4, x.shape[-1] // 4)
            cut(q, core, 4).copy_(part)
        q = trunk(q)  # whole: its norms see the whole image, as in G(x)
        fix(tail, lambda norm: [collect(tail, norm, cut(q, crop, 4), relative(crop, core)) for crop, core in tiles()])
        y, a = None, None
        for crop, core in tiles():
            box = relative(crop, core)
            out, attention = finish(G, cut(tail(cut(q, crop, 4)), box), cut(x, crop), box)
            if y is None:
                y = out.new_empty(*out.shape[:2], *x.shape[-2:])
                a = None if attention is None else out.new_empty(out.shape[0], 1, *x.shape[-2:])
            cut(y, core).copy_(out)
            if a is not None:
                cut(a, core).copy_(attention)
    finally:
        bar.close()
        release(G)
    return y, a


def finish(G, y, x, box):
    """The generator's output and attention map (or None) of a tile: y, its layers' output over the core, x, the
    input over the crop, and box, the core within the crop (relative). The map network's 3 px reach is inside the
    halo, so its map of the core is exact."""
    if isinstance(G, AttentionGenerator):
        a = cut(G.map(x), box)
        return blend(y, a, cut(x, box)), a
    return y, None


@torch.inference_mode()
def share_statistics(G, frames):
    """Fix every norm of G to the statistics it would compute if the frames (each (1, C, H, W), H and W multiples of
    4) were one image: G then translates any frame with them (release(G) undoes it). The frames are held at quarter
    resolution through the residual trunk, about 64 bytes a pixel each."""
    head, trunk, tail = split(G)
    fix(head, lambda norm: [collect(head, norm, f) for f in frames])
    q = torch.cat([head(f) for f in frames])
    for block in trunk:  # the whole batch's statistics, block by block (each block's layers, not the trunk's, again)
        fix(block, lambda norm, q=q, block=block: [collect(block.conv_block, norm, q)])
        q = block(q)
    fix(tail, lambda norm: [collect(tail, norm, q[k : k + 1]) for k in range(len(q))])
