"""CycleGAN networks: the ResNet generator and the 70x70 PatchGAN discriminator (Zhu et al., 2017).

Layer order and state-dict keys match aitorzip/PyTorch-CycleGAN and the authors' released
generators, so their .pth files load with strict=True (see load_generator).
"""
import torch
import torch.nn as nn


class ResidualBlock(nn.Module):
    def __init__(self, in_features):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(in_features, in_features, 3), nn.InstanceNorm2d(in_features), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(in_features, in_features, 3), nn.InstanceNorm2d(in_features),
        )

    def forward(self, x):
        return x + self.conv_block(x)


class Generator(nn.Module):
    """c7s1-64, d128, d256, R256 x n, u128, u64, c7s1-out. Input side must be a multiple of 4."""

    def __init__(self, input_nc, output_nc, n_residual_blocks=9):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, 64, 7), nn.InstanceNorm2d(64), nn.ReLU(inplace=True)]
        features = 64
        for _ in range(2):  # downsample
            layers += [nn.Conv2d(features, features * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(features * 2), nn.ReLU(inplace=True)]
            features *= 2
        layers += [ResidualBlock(features) for _ in range(n_residual_blocks)]
        for _ in range(2):  # upsample
            layers += [nn.ConvTranspose2d(features, features // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.InstanceNorm2d(features // 2), nn.ReLU(inplace=True)]
            features //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(64, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class Discriminator(nn.Module):
    """70x70 PatchGAN: one real/fake score per overlapping patch, (B, 1, H/8 - 2, W/8 - 2)."""

    def __init__(self, input_nc):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(input_nc, 64, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(64, 128, 4, stride=2, padding=1), nn.InstanceNorm2d(128), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(128, 256, 4, stride=2, padding=1), nn.InstanceNorm2d(256), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(256, 512, 4, padding=1), nn.InstanceNorm2d(512), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(512, 1, 4, padding=1),
        )

    def forward(self, x):
        # The seed average-pooled this map to one score per image; the paper scores every patch.
        return self.model(x)  # (B, 1, 30, 30) for 256 px


def weights_init_normal(m):
    """N(0, 0.02) for convolutions, as the paper; InstanceNorm here has no affine weights."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(m.bias)


def load_generator(path, input_nc=3, output_nc=3, map_location="cpu"):
    """Load a generator saved by this repo, the seed or the CycleGAN authors; raise ValueError if it is not one."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist: train first (python train.py) or pass its path") from None
    except Exception as e:
        raise ValueError(f"{path} is not a loadable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a generator state_dict")
    # The authors' files carry InstanceNorm running stats from an old PyTorch; ours has none.
    state = {k.removeprefix("module."): v for k, v in state.items()
             if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    n_blocks = len({k.split(".")[1] for k in state if ".conv_block." in k})
    netG = Generator(input_nc, output_nc, n_blocks or 9)
    try:
        netG.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:3]
        raise ValueError(f"{path} is not a {input_nc}->{output_nc} channel CycleGAN ResNet generator: " + " ".join(first)) from None
    return netG
