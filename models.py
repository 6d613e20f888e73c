"""CycleGAN networks (Zhu et al., 2017): the ResNet generator, the 70x70 PatchGAN discriminator (losses.py: the
objective).

Layer order and state-dict keys match aitorzip/PyTorch-CycleGAN and the authors' released
generators, so their .pth files load with strict=True; load_generator also reads other
implementations' ResNet generators by matching layers by order and shape.
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_weights
from utils import UserError


class Stop(Exception):
    """Raised by an InstanceNorm that collects statistics: the layers after it are not needed."""


class InstanceNorm(nn.InstanceNorm2d):
    """The generator's nn.InstanceNorm2d: the same keys and, by default, the same numbers (its input's own
    statistics). Its statistics can also come from elsewhere (tiles.py: many tiles or frames, one set):
    collect, a list: forward appends its input's per-channel (count, sum, sum of squares), in float64, over
    window = (y0, y1, x0, x1, full_height) (a box in full-resolution px of an input full_height px high; None: all
    of it), and raises Stop. stats = (mean, var), each (C,) float64: forward normalises with them (biased var, eps
    as always)."""

    collect = window = stats = None

    def forward(self, x):
        if self.collect is not None:
            part = x
            if self.window is not None:
                y0, y1, x0, x1, full = self.window
                s = full // x.shape[-2]  # this layer's scale: 1, 2 or 4
                part = x[..., y0 // s : y1 // s, x0 // s : x1 // s]
            part = part.double()
            self.collect.append((part[:, :1].numel(), part.sum((0, 2, 3)), part.square().sum((0, 2, 3))))
            raise Stop
        if self.stats is None:
            return super().forward(x)
        mean, var = self.stats
        y = (x - mean.to(x.dtype)[:, None, None]) * torch.rsqrt(var + self.eps).to(x.dtype)[:, None, None]
        return y * self.weight[:, None, None] + self.bias[:, None, None] if self.affine else y


class ResidualBlock(nn.Module):
    def __init__(self, in_features, affine=False):
        super().__init__()
        norm = partial(InstanceNorm, affine=affine)
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(in_features, in_features, 3),
            norm(in_features),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(in_features, in_features, 3),
            norm(in_features),
        )

    def forward(self, x):
        return x + self.conv_block(x)


class Generator(nn.Module):
    """c7s1-64, d128, d256, R256 x n, u128, u64, c7s1-out. Input side must be a multiple of 4.

    affine=True gives every InstanceNorm a weight and bias, as some other implementations do (the paper's has none).
    """

    def __init__(self, input_nc, output_nc, n_residual_blocks=9, affine=False):
        super().__init__()
        norm = partial(InstanceNorm, affine=affine)
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, 64, 7), norm(64), nn.ReLU(inplace=True)]
        features = 64
        for _ in range(2):  # downsample
            layers += [
                nn.Conv2d(features, features * 2, 3, stride=2, padding=1),
                norm(features * 2),
                nn.ReLU(inplace=True),
            ]
            features *= 2
        layers += [ResidualBlock(features, affine) for _ in range(n_residual_blocks)]
        for _ in range(2):  # upsample
            layers += [
                nn.ConvTranspose2d(features, features // 2, 3, stride=2, padding=1, output_padding=1),
                norm(features // 2),
                nn.ReLU(inplace=True),
            ]
            features //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(64, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class AttentionGenerator(nn.Module):
    """--attention: the paper's generator (the content; keys model.*, as Generator's) and a small network of its own
    (keys attention.*) that says where to use it: a = sigmoid(attention(x)), and the output is the blend
    a * content + (1 - a) * x, so where a = 0 the input passes unchanged.

    The map network is local on purpose: three 3x3 convolutions and a 1x1 (7 px receptive field, no normalisation)
    see colours and edges, not the scene, so it cannot tell the domain from image statistics and mark a whole image
    (what a map from the generator's own trunk did: docs/experiments.md). It starts at a = 0.5. depth: its number of
    3x3 convolutions (2 in the first version of this design, whose files test.py still loads)."""

    DEPTH = 3

    def __init__(self, nc, n_residual_blocks=9, width=32, depth=DEPTH):
        super().__init__()
        self.model = Generator(nc, nc, n_residual_blocks).model
        layers = []
        for i in range(depth):
            layers += [nn.ReflectionPad2d(1), nn.Conv2d(nc if i == 0 else width, width, 3), nn.ReLU(inplace=True)]
        self.attention = nn.Sequential(*layers, nn.Conv2d(width, 1, 1))

    def forward(self, x, attention=False):
        content, a = self.model(x), self.map(x)
        out = blend(content, a, x)
        return (out, a) if attention else out

    def map(self, x):
        """(B, 1, H, W) in [0, 1]: 1 where the content is used, 0 where the input is kept."""
        return torch.sigmoid(self.attention(x))


def blend(content, a, x):
    """An attention generator's output: its content where the map a is 1, the input x where it is 0."""
    return a * content + (1 - a) * x


def generator(input_nc, output_nc, n_blocks=9, attention=False):
    """The paper's ResNet generator, or with --attention its attention-guided form (input_nc == output_nc)."""
    return AttentionGenerator(input_nc, n_blocks) if attention else Generator(input_nc, output_nc, n_blocks)


def attend(G, x):
    """(G(x), G's attention map of x) for an attention generator, (G(x), None) for the paper's."""
    return G(x, attention=True) if isinstance(G, AttentionGenerator) else (G(x), None)


class Discriminator(nn.Module):
    """70x70 PatchGAN: one real/fake score per overlapping patch, (B, 1, H/8 - 2, W/8 - 2)."""

    def __init__(self, input_nc):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(input_nc, 64, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(64, 128, 4, stride=2, padding=1),
            nn.InstanceNorm2d(128),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(128, 256, 4, stride=2, padding=1),
            nn.InstanceNorm2d(256),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(256, 512, 4, padding=1),
            nn.InstanceNorm2d(512),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(512, 1, 4, padding=1),
        )

    def forward(self, x):
        # The seed average-pooled this map to one score per image; the paper scores every patch.
        return self.model(x)  # (B, 1, 30, 30) for 256 px


class MultiScaleDiscriminator(nn.Module):
    """K PatchGANs of the paper's design, the k-th seeing the input average-pooled k times (pix2pixHD's pooling:
    3x3, stride 2, padding not counted): patches of 70, 140, 280, ... px of the input. A list of K patch maps."""

    def __init__(self, input_nc, scales):
        super().__init__()
        self.scales = nn.ModuleList([Discriminator(input_nc) for _ in range(scales)])

    def forward(self, x):
        maps = []
        for k, D in enumerate(self.scales):
            if k:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)  # (B, C, ceil(H/2), ceil(W/2))
            maps.append(D(x))
        return maps


def discriminator(input_nc, scales=1):
    """The paper's PatchGAN (scales=1: the same module and state-dict keys as the seed's), or K of them."""
    return Discriminator(input_nc) if scales == 1 else MultiScaleDiscriminator(input_nc, scales)


def max_scales(size, smallest=24):
    """The most discriminator scales a size x size crop allows: the coarsest, ceil(size / 2^(K-1)) px, must be at
    least `smallest`, the PatchGAN's minimum input (three stride-2 convolutions, then two 4x4 ones)."""
    k = 1
    while -(-size // 2**k) >= smallest:
        k += 1
    return k


class SlicedReflectionPad2d(nn.Module):
    """nn.ReflectionPad2d built from slices, flips and cat: the same numbers, and a backward pass that CUDA computes
    deterministically (the built-in one accumulates with atomics, which --deterministic refuses)."""

    def __init__(self, padding):
        super().__init__()
        self.p = padding

    def forward(self, x):
        p = self.p
        x = torch.cat([x[..., 1 : p + 1].flip(-1), x, x[..., -p - 1 : -1].flip(-1)], -1)
        return torch.cat([x[..., 1 : p + 1, :].flip(-2), x, x[..., -p - 1 : -1, :].flip(-2)], -2)


def use_sliced_padding(net):
    """Swap every ReflectionPad2d of net for SlicedReflectionPad2d, in place (no parameters, so keys stay)."""
    for module in net.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ReflectionPad2d):
                setattr(module, name, SlicedReflectionPad2d(child.padding[0]))
    return net


def weights_init_normal(m):
    """N(0, 0.02) for convolutions, as the paper; the paper's InstanceNorm has no affine weights to initialise."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(m.bias)


def load_generator(path, input_nc=3, output_nc=3):
    """Load a ResNet generator saved by this repo, the seed, the CycleGAN authors or another implementation.

    Our keys (behind an optional `module.` prefix) load strictly by name. Any other file is matched by order and
    shape: its 4-D tensors are the 6 + 2n conv/convT weights in layer order, each followed by its bias and, if the
    norms are affine, by the next InstanceNorm's weight and bias; the generator built has the n residual blocks and
    the norm kind the file describes, whatever the keys are called. Channel counts are the caller's, not inferred:
    the caller reads its images with input_nc channels, so a file for other counts is refused, naming them.
    Raises ValueError (one line: what was expected, what was found) for anything else.
    """
    try:
        state = load_weights(path)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist: train first (python train.py) or pass its path") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a generator state_dict")
    # The authors' files carry InstanceNorm running stats from an old PyTorch; ours has none.
    state = {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    maps = {
        k.removeprefix("module."): v for k, v in state.items() if k.removeprefix("module.").startswith("attention.")
    }
    state = {k: v for k, v in state.items() if k.removeprefix("module.") not in maps}  # the rest: the content
    n_convs = sum(v.dim() == 4 for v in state.values())  # c7s1 + 2 down + 2 per residual block + 2 up + c7s1
    n_vectors = sum(v.dim() == 1 for v in state.values())  # conv biases, plus weight and bias of each affine norm
    affine = n_vectors == n_convs + 2 * (n_convs - 1)  # every conv but the last is followed by a norm
    n_others = len(state) - n_convs - n_vectors
    if n_convs < 6 or n_convs % 2 or n_vectors not in (n_convs, n_convs + 2 * (n_convs - 1)) or n_others:
        raise ValueError(
            f"{path} is not a CycleGAN ResNet generator: expected 6 + 2n conv weights (4-D) with a bias each, "
            f"and optionally a weight and bias per InstanceNorm; found {n_convs} 4-D, {n_vectors} 1-D and "
            f"{n_others} other tensors"
        )
    weights = [v for v in state.values() if v.dim() == 4]
    kernels = [tuple(w.shape[-2:]) for w in weights]
    if kernels != [(7, 7)] + [(3, 3)] * (n_convs - 2) + [(7, 7)]:  # c7s1, 3x3 down/residual/up, c7s1
        what = (
            "a U-Net generator (the authors' unet_128 / unet_256: 4x4 convolutions down and up)"
            if set(kernels) == {(4, 4)}
            else f"not a ResNet generator (its convolutions are "
            f"{', '.join(f'{h}x{w}' for h, w in dict.fromkeys(kernels))}, not 7x7 then 3x3 then 7x7)"
        )
        raise ValueError(
            f"{path} is {what}: this repository's generator is the paper's ResNet one (the authors' "
            f"resnet_9blocks / resnet_6blocks), so it cannot load this file"
        )
    if not maps and not affine and input_nc == output_nc == weights[-1].shape[0] - 1:
        raise ValueError(
            f"{path} is an --attention generator of the first design (its map a channel of the generator's own "
            f"output), which learned no map and which this version does not load (docs/experiments.md): train it "
            f"again with --attention"
        )
    if (weights[0].shape[1], weights[-1].shape[0]) != (input_nc, output_nc):
        raise ValueError(
            f"{path} is not a {input_nc}->{output_nc} channel generator: it translates {weights[0].shape[1]} "
            f"to {weights[-1].shape[0]} channels; set the channel counts (--input_nc, --output_nc) to match"
        )
    n_blocks = (n_convs - 6) // 2
    build = partial(Generator, input_nc, output_nc, n_blocks, affine)
    with torch.device("meta"):  # shapes only: a file that claims 1000 blocks costs nothing until its shapes fit
        expected = build().state_dict()
    keys = {k.removeprefix("module."): k for k in state}  # our name -> the file's
    if keys.keys() != expected.keys():  # another implementation's names: take the file's tensors in order
        keys = dict(zip(expected, state))
    for name, want in expected.items():
        if state[keys[name]].shape != want.shape:
            raise ValueError(
                f"{path} is not a CycleGAN ResNet generator: its tensor {keys[name]} has shape "
                f"{tuple(state[keys[name]].shape)} where a {n_blocks}-block generator has {name} of "
                f"shape {tuple(want.shape)}"
            )
    netG = build()
    netG.load_state_dict({name: state[key] for name, key in keys.items()})
    return with_map(netG, maps, path) if maps else netG


def map_depth(state):
    """How many 3x3 convolutions the attention.* tensors of a state_dict have (a damaged checkpoint's non-tensors
    are not counted: restoring it says what is wrong)."""
    convs = [v for k, v in state.items() if str(k).startswith("attention.") and isinstance(v, torch.Tensor)]
    return sum(v.dim() == 4 and v.shape[-1] == 3 for v in convs)


def check_map_design(state, path):
    """Refuse, in one line, a resume whose generator state_dict is of an earlier --attention design."""
    depth = map_depth(state)
    if depth == 0:
        raise UserError(
            f"{path} is an --attention run of the first design (its map a channel of the generator's own output), "
            f"which learned no map and which this version cannot resume (docs/experiments.md): start it again"
        )
    if depth != AttentionGenerator.DEPTH:
        raise UserError(
            f"{path} is an --attention run with a {2 * depth + 1} px map network ({depth} 3x3 convolutions; this "
            f"version's has {AttentionGenerator.DEPTH}: CHANGELOG.md), which this version cannot resume; test.py "
            f"still translates with its generators; start training again to go on"
        )


def with_map(content, maps, path):
    """An AttentionGenerator of the loaded content generator and the file's attention.* tensors."""
    nc, n_blocks = content.model[1].in_channels, sum(isinstance(m, ResidualBlock) for m in content.model)
    G = AttentionGenerator(nc, n_blocks, depth=max(map_depth(maps), 1))
    try:
        G.attention.load_state_dict({k.removeprefix("attention."): v for k, v in maps.items()})
    except RuntimeError:  # missing, unexpected or misshapen tensors
        raise ValueError(
            f"{path}: its attention.* tensors do not fit a map network of 3x3 convolutions and a 1x1 with 32 "
            f"filters: is it a generator of train.py --attention?"
        ) from None
    G.model.load_state_dict(content.model.state_dict())
    return G
