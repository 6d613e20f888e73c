"""CycleGAN networks: the ResNet generator, the 70x70 PatchGAN discriminator, and the objective (Zhu et al., 2017).

Layer order and state-dict keys match aitorzip/PyTorch-CycleGAN and the authors' released
generators, so their .pth files load with strict=True; load_generator also reads other
implementations' ResNet generators by matching layers by order and shape.
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_weights


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
    """--attention (after Mejjati et al., 2018, and AttentionGAN): the paper's generator with one more output channel
    from the same trunk, an attention map a = sigmoid(.) that says where to translate; the output is the content
    tanh(.) blended with the input, a * content + (1 - a) * x, so where a = 0 the input passes unchanged. Same keys
    as Generator; only the last convolution has nc + 1 filters, which is how load_generator recognises the file."""

    # The map starts near 1 (sigmoid(3) = 0.95 for the initial outputs near 0): the paper's generator, which then
    # learns where not to translate.
    OFFSET = 3.0

    def __init__(self, nc, n_residual_blocks=9):
        super().__init__()
        self.model = Generator(nc, nc + 1, n_residual_blocks).model[:-1]  # no Tanh: content and map get their own

    def forward(self, x, attention=False):
        content, a = self.parts(x)
        out = blend(content, a, x)
        return (out, a) if attention else out

    def parts(self, x):
        """(content, a): (B, C, H, W) in [-1, 1] and (B, 1, H, W) in [0, 1], before the blend."""
        return self.split(self.model(x))

    def split(self, y):
        """(content, a) of the network's raw (B, C + 1, H, W) output."""
        return torch.tanh(y[:, :-1]), torch.sigmoid(y[:, -1:] + self.OFFSET)


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
    # One filter more than the image has channels: the attention map of an AttentionGenerator (train.py --attention).
    attention = not affine and input_nc == output_nc == weights[-1].shape[0] - 1
    if (weights[0].shape[1], weights[-1].shape[0] - attention) != (input_nc, output_nc):
        raise ValueError(
            f"{path} is not a {input_nc}->{output_nc} channel generator: it translates {weights[0].shape[1]} "
            f"to {weights[-1].shape[0]} channels; set the channel counts (--input_nc, --output_nc) to match"
        )
    n_blocks = (n_convs - 6) // 2
    build = (
        partial(AttentionGenerator, input_nc, n_blocks)
        if attention
        else partial(Generator, input_nc, output_nc, n_blocks, affine)
    )
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
    return netG


# ---- The objective: each update's whole loss is one module's forward, so DDP sees one forward per backward ----


class GeneratorLoss(nn.Module):
    """Both generators' loss for a batch. The discriminators are inputs, frozen by the caller, not parameters."""

    def __init__(self, G_A2B, G_B2A, lambda_cycle, lambda_identity, lambda_tv=0.0):
        super().__init__()
        self.G_A2B, self.G_B2A = G_A2B, G_B2A
        self.lambda_cycle, self.lambda_identity, self.lambda_tv = lambda_cycle, lambda_identity, lambda_tv

    def forward(self, real_A, real_B, D_A, D_B):
        identity = self.lambda_identity > 0
        # cyc_*, idt_*: as the cycle and identity losses see them (attention generators: the map's gradient stopped)
        fake_B, cyc_B, idt_B, map_B = generate(self.G_A2B, real_A, real_B, identity)
        fake_A, cyc_A, idt_A, map_A = generate(self.G_B2A, real_B, real_A, identity)
        rec_A, rec_B = for_cycle(self.G_B2A, cyc_B), for_cycle(self.G_A2B, cyc_A)
        loss_G_GAN = lsgan(D_B(fake_B), 1.0) + lsgan(D_A(fake_A), 1.0)
        loss_G_cycle = self.lambda_cycle * (F.l1_loss(rec_A, real_A) + F.l1_loss(rec_B, real_B))
        loss_G_identity = (
            self.lambda_cycle * self.lambda_identity * (F.l1_loss(idt_A, real_A) + F.l1_loss(idt_B, real_B))
            if identity
            else real_A.new_zeros((), dtype=torch.float32)
        )
        loss_G = loss_G_GAN + loss_G_cycle + loss_G_identity
        if map_B is not None:  # --attention: smooth maps, part of loss_G (losses.csv keeps its columns)
            loss_G = loss_G + self.lambda_tv * (total_variation(map_A) + total_variation(map_B))
        return (loss_G, loss_G_identity, loss_G_GAN, loss_G_cycle), (fake_A, fake_B, rec_A, rec_B)


class DiscriminatorLoss(nn.Module):
    """LSGAN loss of each discriminator: real -> 1, fake -> 0, halved as in the paper to slow D down."""

    def __init__(self, D_A, D_B):
        super().__init__()
        self.D_A, self.D_B = D_A, D_B

    def forward(self, real_A, real_B, fake_A, fake_B):
        loss_D_A = 0.5 * (lsgan(self.D_A(real_A), 1.0) + lsgan(self.D_A(fake_A), 0.0))
        loss_D_B = 0.5 * (lsgan(self.D_B(real_B), 1.0) + lsgan(self.D_B(fake_B), 0.0))
        return loss_D_A, loss_D_B


def generate(G, x, y, identity):
    """(G(x), G(x) for the cycle loss, G(y) for the identity loss or None, G's attention map of x or None), from one
    batched pass: InstanceNorm keeps the samples independent. The paper's generator: the same G(x) twice; an
    attention generator's second and third are blended with the map's gradient stopped (see stopped_blend)."""
    both, n = torch.cat([x, y]) if identity else x, len(x)
    if isinstance(G, AttentionGenerator):
        content, a = G.parts(both)
        fake = blend(content[:n], a[:n], x)
        kept = stopped_blend(content, a, both)
        a = a[:n]
    else:
        kept, a = G(both), None
        fake = kept[:n]
    cyc, idt = kept.chunk(2) if identity else (kept, None)
    return fake, cyc, idt, a


def stopped_blend(content, a, x):
    """An attention generator's output with the map's gradient stopped: what the cycle and identity losses see, so
    that the maps learn from the adversarial loss and the total variation only. With the cycle loss's gradient they
    fell to 0 everywhere within an epoch on the demo (a generator that changes nothing makes the cycle loss 0, and
    sigmoid's gradient then vanishes); with the identity loss's, they became a domain detector (0 on the target
    domain) and the content never learned (docs/experiments.md)."""
    return blend(content, a.detach(), x)


def for_cycle(G, x):
    """G(x) as the cycle loss sees it (an attention generator's map gradient stopped)."""
    return stopped_blend(*G.parts(x), x) if isinstance(G, AttentionGenerator) else G(x)


def total_variation(a):
    """Mean absolute difference between neighbouring pixels of the (B, 1, H, W) maps: 0 for a constant map."""
    return (a[..., 1:, :] - a[..., :-1, :]).abs().mean() + (a[..., 1:] - a[..., :-1]).abs().mean()


def lsgan(pred, target):
    """Least-squares GAN loss on every patch of the (B, 1, H/8 - 2, W/8 - 2) map, towards a constant target; for a
    multi-scale discriminator's list of maps, the mean over scales (so the adversarial term keeps its weight against
    lambda_cycle, whatever the number of scales)."""
    if isinstance(pred, list):
        return sum(lsgan(p, target) for p in pred) / len(pred)
    return F.mse_loss(pred, torch.full_like(pred, target))
