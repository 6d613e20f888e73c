import pytest
import torch
import torch.nn as nn

from models import Discriminator, Generator, ResidualBlock, load_generator


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_parameter_counts_match_the_paper():
    assert n_params(Generator(3, 3)) == 11_378_179
    assert n_params(Discriminator(3)) == 2_764_737


def test_state_dict_keys_are_the_seeds():
    keys = set(Generator(3, 3).state_dict())
    expected = {f"model.{i}.{p}" for i in (1, 4, 7, 19, 22, 26) for p in ("weight", "bias")}
    expected |= {f"model.{i}.conv_block.{j}.{p}" for i in range(10, 19) for j in (1, 5) for p in ("weight", "bias")}
    assert keys == expected


def test_shapes():
    G, D = Generator(3, 1), Discriminator(1)
    fake = G(torch.zeros(2, 3, 64, 48))
    assert fake.shape == (2, 1, 64, 48)
    assert fake.abs().max() <= 1
    assert D(fake).shape == (2, 1, 6, 4)  # 64/8 - 2, 48/8 - 2 patches
    assert D(torch.zeros(1, 1, 256, 256)).shape == (1, 1, 30, 30)


def test_seed_format_loads_strictly(tmp_path):
    G = Generator(3, 3)
    torch.save(G.state_dict(), tmp_path / "netG_A2B.pth")
    loaded = load_generator(tmp_path / "netG_A2B.pth")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(G.eval()(x), loaded.eval()(x))


def test_authors_format_with_running_stats_loads(tmp_path):
    """The authors' released .pth files: an old PyTorch saved InstanceNorm running stats (69 extra keys)."""
    G = Generator(3, 3)
    state = dict(G.state_dict())
    norms = [name for name, m in G.named_modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    for name in norms:
        c = G.get_submodule(name).num_features
        state[f"{name}.running_mean"] = torch.zeros(c)
        state[f"{name}.running_var"] = torch.ones(c)
        state[f"{name}.num_batches_tracked"] = torch.tensor(0)
    assert len(state) - len(G.state_dict()) == 69
    torch.save(state, tmp_path / "horse2zebra.pth")
    loaded = load_generator(tmp_path / "horse2zebra.pth")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(G.eval()(x), loaded.eval()(x))


def test_ddp_prefixed_keys_load(tmp_path):
    G = Generator(3, 3)
    torch.save({f"module.{k}": v for k, v in G.state_dict().items()}, tmp_path / "g.pth")
    load_generator(tmp_path / "g.pth")


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.save(Discriminator(3).state_dict(), p),
        lambda p: torch.save(Generator(1, 3).state_dict(), p),
        lambda p: p.write_bytes(b"not a checkpoint"),
        lambda p: torch.save([1, 2, 3], p),
    ],
)
def test_not_a_generator_is_a_clear_error(tmp_path, make):
    path = tmp_path / "x.pth"
    make(path)
    with pytest.raises(ValueError, match="x.pth"):
        load_generator(path)


def test_missing_checkpoint_says_to_train(tmp_path):
    with pytest.raises(ValueError, match="train first"):
        load_generator(tmp_path / "nope.pth")


def test_channel_mismatch_names_both_counts(tmp_path):
    torch.save(Generator(1, 3).state_dict(), tmp_path / "gray2rgb.pth")
    with pytest.raises(ValueError, match="is not a 3->3 channel generator: it translates 1 to 3 channels"):
        load_generator(tmp_path / "gray2rgb.pth")
    assert load_generator(tmp_path / "gray2rgb.pth", input_nc=1, output_nc=3)


def test_affine_option_adds_norm_parameters_only():
    G = Generator(3, 3, n_residual_blocks=6, affine=True)
    n_norms = 5 + 2 * 6
    norms = [m for m in G.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == n_norms and all(m.affine for m in norms)
    assert n_params(G) == n_params(Generator(3, 3, n_residual_blocks=6)) + 2 * sum(m.num_features for m in norms)


# ---- generators written by other ResNet-CycleGAN implementations ----


class OtherBlock(nn.Module):
    def __init__(self, c, affine):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(c, c, 3),
            nn.InstanceNorm2d(c, affine=affine),
            nn.ReLU(),
            nn.ReflectionPad2d(1),
            nn.Conv2d(c, c, 3),
            nn.InstanceNorm2d(c, affine=affine),
        )

    def forward(self, x):
        return x + self.block(x)


class OtherResnetGenerator(nn.Module):
    """Another implementation's generator: the same computation, its own module tree and names (`block`)."""

    def __init__(self, n_blocks=9, affine=False):
        super().__init__()
        norm = lambda c: nn.InstanceNorm2d(c, affine=affine)  # noqa: E731
        self.head = nn.Sequential(
            nn.ReflectionPad2d(3),
            nn.Conv2d(3, 64, 7),
            norm(64),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, 2, 1),
            norm(128),
            nn.ReLU(),
            nn.Conv2d(128, 256, 3, 2, 1),
            norm(256),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*[OtherBlock(256, affine) for _ in range(n_blocks)])
        self.tail = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, 2, 1, 1),
            norm(128),
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 3, 2, 1, 1),
            norm(64),
            nn.ReLU(),
            nn.ReflectionPad2d(3),
            nn.Conv2d(64, 3, 7),
            nn.Tanh(),
        )
        for m in self.modules():  # affine norms far from identity, so that a misplaced one changes the output
            if isinstance(m, nn.InstanceNorm2d) and affine:
                nn.init.normal_(m.weight, 1.0, 0.5)
                nn.init.normal_(m.bias, 0.0, 0.5)

    def forward(self, x):
        return self.tail(self.blocks(self.head(x)))


@pytest.mark.parametrize(
    "n_blocks, affine, prefix",
    [
        (9, False, "netG."),
        (9, True, ""),
        (6, True, "module.generator."),
    ],
)
def test_other_implementations_load_with_the_same_output(tmp_path, n_blocks, affine, prefix):
    torch.manual_seed(n_blocks + affine)
    other = OtherResnetGenerator(n_blocks, affine).eval()
    torch.save({prefix + k: v for k, v in other.state_dict().items()}, tmp_path / "other.pth")
    loaded = load_generator(tmp_path / "other.pth").eval()
    assert sum(isinstance(m, ResidualBlock) for m in loaded.modules()) == n_blocks
    assert n_params(loaded) == n_params(other)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), other(x), atol=1e-6)


def test_other_layout_that_does_not_match_says_what_was_expected(tmp_path):
    """Upsample + Conv instead of ConvTranspose (as some implementations do): same count, transposed weight shape."""
    state = OtherResnetGenerator(6).state_dict()
    state["tail.0.weight"] = state["tail.0.weight"].transpose(0, 1).contiguous()
    torch.save(state, tmp_path / "upsample.pth")
    with pytest.raises(ValueError) as e:
        load_generator(tmp_path / "upsample.pth")
    assert "tail.0.weight" in str(e.value) and "(128, 256, 3, 3)" in str(e.value) and "(256, 128, 3, 3)" in str(e.value)
    del state["tail.0.bias"]  # a conv without bias: the counts no longer fit
    torch.save(state, tmp_path / "upsample.pth")
    with pytest.raises(ValueError, match="expected 6 \\+ 2n conv weights .* found 18 4-D, 17 1-D and 0 other"):
        load_generator(tmp_path / "upsample.pth")


def test_a_u_net_generator_is_named_as_one(tmp_path):
    """The authors' unet_256 (8 4x4 convolutions down, 8 transposed up, a bias each with InstanceNorm): the file is
    named for what it is, not blamed on channel counts."""
    down = [3, 64, 128, 256, 512, 512, 512, 512, 512]
    state = {}
    for i, (a, b) in enumerate(zip(down, down[1:])):
        state[f"model.down{i}.weight"], state[f"model.down{i}.bias"] = torch.zeros(b, a, 4, 4), torch.zeros(b)
    up = [512, 1024, 1024, 1024, 1024, 512, 256, 128]  # inputs: the skip connections double them
    for i, (a, b) in enumerate(zip(up, [512, 512, 512, 512, 256, 128, 64, 3])):
        state[f"model.up{i}.weight"], state[f"model.up{i}.bias"] = torch.zeros(a, b, 4, 4), torch.zeros(b)
    torch.save(state, tmp_path / "unet.pth")
    with pytest.raises(ValueError) as e:
        load_generator(tmp_path / "unet.pth")
    assert "U-Net" in str(e.value) and "ResNet" in str(e.value) and "--input_nc" not in str(e.value)
    state = {k: v[..., :3, :3] if v.dim() == 4 else v for k, v in state.items()}  # 3x3 kernels: not ours either
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a ResNet generator .its convolutions are 3x3"):
        load_generator(tmp_path / "other.pth")
