"""The fast training step computes what the paper's step computes, written out plainly here."""

import contextlib
import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import before_instance_norm
from models import Discriminator, Generator, SlicedReflectionPad2d, use_sliced_padding
from utils import ReplayBuffer

train = importlib.import_module("train")
LAMBDA_CYCLE, LAMBDA_IDENTITY, LR = 10.0, 0.5, 2e-4


def plain_step(G_A2B, G_B2A, D_A, D_B, optimizer_G, optimizer_D, real_A, real_B):
    """The step as the seed writes it: six generator calls, D gradients computed (and dropped) in the G step."""
    optimizer_G.zero_grad()
    same_B, same_A = G_A2B(real_B), G_B2A(real_A)
    fake_B, fake_A = G_A2B(real_A), G_B2A(real_B)
    rec_A, rec_B = G_B2A(fake_B), G_A2B(fake_A)
    pred_fake_B, pred_fake_A = D_B(fake_B), D_A(fake_A)
    loss_GAN = F.mse_loss(pred_fake_B, torch.ones_like(pred_fake_B)) + F.mse_loss(
        pred_fake_A, torch.ones_like(pred_fake_A)
    )
    loss_cycle = LAMBDA_CYCLE * (F.l1_loss(rec_A, real_A) + F.l1_loss(rec_B, real_B))
    loss_identity = LAMBDA_CYCLE * LAMBDA_IDENTITY * (F.l1_loss(same_A, real_A) + F.l1_loss(same_B, real_B))
    loss_G = loss_GAN + loss_cycle + loss_identity
    loss_G.backward()
    optimizer_G.step()

    optimizer_D.zero_grad()
    losses_D = []
    for D, real, fake in ((D_A, real_A, fake_A), (D_B, real_B, fake_B)):
        pred_real, pred_fake = D(real), D(fake.detach())
        losses_D.append(
            0.5
            * (F.mse_loss(pred_real, torch.ones_like(pred_real)) + F.mse_loss(pred_fake, torch.zeros_like(pred_fake)))
        )
    (losses_D[0] + losses_D[1]).backward()
    optimizer_D.step()
    return torch.stack([loss_G, loss_identity, loss_GAN, loss_cycle, losses_D[0] + losses_D[1], *losses_D]).detach()


def nets(seed=0):
    torch.manual_seed(seed)
    return [Generator(3, 3), Generator(3, 3), Discriminator(3), Discriminator(3)]


def our_step(G_A2B, G_B2A, D_A, D_B, autocast=None):
    """train.py's step, set up as main() sets it up on the CPU."""
    autocast = autocast or contextlib.nullcontext()
    adam = lambda params: torch.optim.Adam(params, lr=LR, betas=(0.5, 0.999), fused=True)  # noqa: E731
    optimizer_G, optimizer_D = (
        adam([*G_A2B.parameters(), *G_B2A.parameters()]),
        adam([*D_A.parameters(), *D_B.parameters()]),
    )
    buffers = ReplayBuffer(50, 0), ReplayBuffer(50, 1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = lambda a, b: train.train_step(  # noqa: E731
        train.GeneratorLoss(G_A2B, G_B2A, LAMBDA_CYCLE, LAMBDA_IDENTITY),
        train.DiscriminatorLoss(D_A, D_B),
        (D_A, D_B),
        optimizer_G,
        optimizer_D,
        scaler,
        autocast,
        buffers,
        a,
        b,
        buffers[0].draw(len(a)),
        buffers[1].draw(len(a)),
    )
    return step


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1


def plain(batch, autocast=None):
    """Losses, weights and last gradients of each network after one plain step from nets(0)."""
    autocast = autocast or contextlib.nullcontext()
    G_A2B, G_B2A, D_A, D_B = nets()
    adam = lambda params: torch.optim.Adam(params, lr=LR, betas=(0.5, 0.999))  # noqa: E731
    with autocast:
        losses = plain_step(
            G_A2B,
            G_B2A,
            D_A,
            D_B,
            adam([*G_A2B.parameters(), *G_B2A.parameters()]),
            adam([*D_A.parameters(), *D_B.parameters()]),
            *batch,
        )
    return (
        losses,
        [copy.deepcopy(net.state_dict()) for net in (G_A2B, G_B2A, D_A, D_B)],
        gradients(G_A2B, G_B2A, D_A, D_B),
    )


def gradients(*nets):
    return [{k: p.grad.clone() for k, p in net.named_parameters()} for net in nets]


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


@pytest.fixture(scope="module")
def reference(batch):
    return plain(batch)


def test_one_fast_fp32_step_equals_the_plain_six_call_step(batch, reference):
    ref_losses, ref_states, ref_grads = reference
    G_A2B, G_B2A, D_A, D_B = nets()
    start = copy.deepcopy(G_A2B.state_dict())
    losses, (fake_A, fake_B, rec_A, rec_B) = our_step(G_A2B, G_B2A, D_A, D_B)(*batch)
    assert losses.shape == (7,) and relative_error(losses, ref_losses) <= 1e-5, (losses, ref_losses)
    for net, ref, grads in zip((G_A2B, G_B2A, D_A, D_B), ref_states, ref_grads):
        noise = before_instance_norm(net)
        scale = max(g.abs().max() for g in grads.values())
        for k, v in net.state_dict().items():
            if k in noise:  # gradient 0 up to rounding, so both moved by at most lr in any direction
                assert grads[k].abs().max() < 1e-5 * scale and (v - ref[k]).abs().max() <= 2 * LR * 1.001, k
            else:
                assert relative_error(v, ref[k]) <= 1e-5, k
    assert not torch.equal(G_A2B.state_dict()["model.1.weight"], start["model.1.weight"])  # it did train
    assert fake_A.shape == rec_B.shape == batch[0].shape


@pytest.mark.slow
def test_the_amp_step_stays_within_bfloat16_tolerance(batch, reference):
    batch = [x[:1, :, :24, :24] for x in batch]  # bfloat16 is slow on CPUs without bfloat16 units
    bf16 = torch.autocast("cpu", torch.bfloat16, cache_enabled=False)
    ref_losses = plain(batch)[0]
    _, _, bf16_grads = plain(batch, bf16)
    G_A2B, G_B2A, D_A, D_B = nets()
    losses, _ = our_step(G_A2B, G_B2A, D_A, D_B, bf16)(*batch)
    assert relative_error(losses, ref_losses) <= 1e-2, (losses, ref_losses)
    # bfloat16 keeps 8 bits: its gradients are ~0.9-0.95 aligned with float32's at init (the plain step's too), so
    # they are compared with the plain step's under the same autocast.
    for ours, theirs in zip(gradients(G_A2B, G_B2A, D_A, D_B), bf16_grads):
        assert F.cosine_similarity(flat(ours), flat(theirs), dim=0) > 0.999


def test_the_replay_buffer_matches_the_papers_list_version():
    """Shrivastava et al.'s buffer written as a list, fed the same fakes and the same random stream."""

    def list_version(data, batch, generator, max_size):
        out = []
        for x in batch.unsqueeze(1):
            if len(data) < max_size:
                data.append(x.clone())
                out.append(x)
            elif torch.rand(1, generator=generator).item() > 0.5:
                i = torch.randint(max_size, (1,), generator=generator).item()
                out.append(data[i])
                data[i] = x.clone()
            else:
                out.append(x)
        return torch.cat(out)

    ours, data, generator = ReplayBuffer(5, seed=7), [], torch.Generator().manual_seed(7)
    for t in range(40):
        fakes = torch.full((3, 1, 2, 2), float(t)) + torch.arange(3.0).view(3, 1, 1, 1) / 10
        expected = list_version(data, fakes, generator, 5)
        assert torch.equal(ours.push_and_pop(fakes, ours.draw(3)), expected), t
    restored = ReplayBuffer(5, seed=0)
    restored.load_state_dict(ours.state_dict(), "cpu")
    fakes = torch.rand(3, 1, 2, 2)
    assert torch.equal(restored.push_and_pop(fakes, restored.draw(3)), list_version(data, fakes, generator, 5))
    assert torch.equal(ReplayBuffer(0).push_and_pop(fakes, ReplayBuffer(0).draw(3)), fakes)  # --pool_size 0


def test_sliced_reflection_padding_equals_the_built_in_one_forward_and_backward():
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    for p in (1, 3):
        ours, theirs = SlicedReflectionPad2d(p)(x), nn.ReflectionPad2d(p)(x)
        assert torch.equal(ours, theirs)
        g = torch.randn_like(ours)
        torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0])
    G = Generator(3, 3)
    keys = list(G.state_dict())
    y = G(x[:, :, :8, :8].detach())
    use_sliced_padding(G)
    assert not any(isinstance(m, nn.ReflectionPad2d) for m in G.modules()) and list(G.state_dict()) == keys
    torch.testing.assert_close(G(x[:, :, :8, :8].detach()), y)
