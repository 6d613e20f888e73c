import pytest
import torch

from models import Discriminator, Generator, load_generator


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


@pytest.mark.parametrize("make", [
    lambda p: torch.save(Discriminator(3).state_dict(), p),
    lambda p: torch.save(Generator(1, 3).state_dict(), p),
    lambda p: p.write_bytes(b"not a checkpoint"),
    lambda p: torch.save([1, 2, 3], p),
])
def test_not_a_generator_is_a_clear_error(tmp_path, make):
    path = tmp_path / "x.pth"
    make(path)
    with pytest.raises(ValueError, match="x.pth"):
        load_generator(path)


def test_missing_checkpoint_says_to_train(tmp_path):
    with pytest.raises(ValueError, match="train first"):
        load_generator(tmp_path / "nope.pth")
