"""The CycleGAN objective (Zhu et al., 2017), and --attention's: each update's whole loss is one module's forward, so
DDP sees one forward per backward. The discriminators are inputs, frozen by the caller, not parameters.

Each generator loss returns (loss_G, its logged terms by name), (fake_A, fake_B, rec_A, rec_B): the fakes are what
the discriminators learn from next (AttentionLoss: two per image)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import blend


class GeneratorLoss(nn.Module):
    """Both generators' loss for a batch: GAN + lambda_cycle * cycle + lambda_cycle * lambda_identity * identity."""

    def __init__(self, G_A2B, G_B2A, lambda_cycle, lambda_identity):
        super().__init__()
        self.G_A2B, self.G_B2A = G_A2B, G_B2A
        self.lambda_cycle, self.lambda_identity = lambda_cycle, lambda_identity

    def forward(self, real_A, real_B, D_A, D_B):
        out, terms = self.paper(self.G_A2B, self.G_B2A, real_A, real_B, D_A, D_B)
        loss_G = terms["loss_G_GAN"] + terms["loss_G_cycle"] + terms["loss_G_identity"]
        return (loss_G, terms), (out["fake_A"], out["fake_B"], out["rec_A"], out["rec_B"])

    def paper(self, G_A2B, G_B2A, real_A, real_B, D_A, D_B):
        """The paper's three terms for the networks G_A2B and G_B2A: (their outputs by name, the terms by name)."""
        identity = self.lambda_identity > 0
        fake_B, idt_B = translations(G_A2B, real_A, real_B, identity)
        fake_A, idt_A = translations(G_B2A, real_B, real_A, identity)
        rec_A, rec_B = G_B2A(fake_B), G_A2B(fake_A)
        loss_G_GAN = lsgan(D_B(fake_B), 1.0) + lsgan(D_A(fake_A), 1.0)
        loss_G_cycle = self.lambda_cycle * (F.l1_loss(rec_A, real_A) + F.l1_loss(rec_B, real_B))
        loss_G_identity = self.identity_loss(idt_A, real_A, idt_B, real_B)
        out = {"fake_A": fake_A, "fake_B": fake_B, "rec_A": rec_A, "rec_B": rec_B, "idt_A": idt_A, "idt_B": idt_B}
        return out, {"loss_G_identity": loss_G_identity, "loss_G_GAN": loss_G_GAN, "loss_G_cycle": loss_G_cycle}

    def identity_loss(self, idt_A, real_A, idt_B, real_B):
        if idt_A is None:
            return real_A.new_zeros((), dtype=torch.float32)
        return self.lambda_cycle * self.lambda_identity * (F.l1_loss(idt_A, real_A) + F.l1_loss(idt_B, real_B))


class AttentionLoss(GeneratorLoss):
    """--attention's loss for two AttentionGenerators, in two independent parts (docs/experiments.md says why).

    The contents (each generator's paper network) minimise the paper's loss on their own outputs, as if there were
    no maps, and the maps' loss does not reach them.

    The maps minimise, with the contents held fixed (detached), loss_map =
      GAN of the blend a * content + (1 - a) * x                     (translate where that looks like the target)
      + lambda_cycle * lambda_identity * identity of the blend        (keep: a real B image needs no change, so
                                                                       G_A2B's map falls to 0 where its content
                                                                       would change it)
      + lambda_tv * total variation + lambda_sparsity * mean(a)       (smooth maps; a pull towards keeping, as
                                                                       Chen et al.'s sparsity; below 0 it keeps
                                                                       the maps from collapsing to "copy").

    The discriminators learn from two fakes per image, the blend and the content."""

    def __init__(self, G_A2B, G_B2A, lambda_cycle, lambda_identity, lambda_tv, lambda_sparsity):
        super().__init__(G_A2B, G_B2A, lambda_cycle, lambda_identity)
        self.lambda_tv, self.lambda_sparsity = lambda_tv, lambda_sparsity

    def forward(self, real_A, real_B, D_A, D_B):
        identity = self.lambda_identity > 0
        G_A2B, G_B2A = self.G_A2B, self.G_B2A

        # ---- The contents: the paper's loss ----
        content, terms = self.paper(G_A2B.model, G_B2A.model, real_A, real_B, D_A, D_B)
        content_A, content_B = content["fake_A"], content["fake_B"]

        # ---- The maps: where to use the content, which is held fixed ----
        map_B, idt_map_B = translations(G_A2B.map, real_A, real_B, identity)  # (B, 1, H, W) in [0, 1]
        map_A, idt_map_A = translations(G_B2A.map, real_B, real_A, identity)
        fake_B, fake_A = blend(content_B.detach(), map_B, real_A), blend(content_A.detach(), map_A, real_B)
        loss_map = lsgan(D_B(fake_B), 1.0) + lsgan(D_A(fake_A), 1.0)
        if identity:
            idt_B = blend(content["idt_B"].detach(), idt_map_B, real_B)
            idt_A = blend(content["idt_A"].detach(), idt_map_A, real_A)
            loss_map = loss_map + self.identity_loss(idt_A, real_A, idt_B, real_B)
        loss_map = loss_map + self.lambda_tv * (total_variation(map_A) + total_variation(map_B))
        loss_map = loss_map + self.lambda_sparsity * (map_A.mean() + map_B.mean())

        loss_G = terms["loss_G_GAN"] + terms["loss_G_cycle"] + terms["loss_G_identity"] + loss_map
        terms.update(loss_map=loss_map, map_A=map_A.mean(), map_B=map_B.mean())
        # The discriminators learn from both: the contents (as the paper's do) and the blends, so that they also see
        # what a map keeps, and judge an untranslated region fake (learning only from the contents, they never saw
        # the source domain, and the maps kept whatever they scored well: green summer ground, docs/experiments.md).
        fakes_A, fakes_B = torch.cat([fake_A, content_A]), torch.cat([fake_B, content_B])  # the blends first: shown
        return (loss_G, terms), (fakes_A, fakes_B, content["rec_A"], content["rec_B"])


class DiscriminatorLoss(nn.Module):
    """LSGAN loss of each discriminator: real -> 1, fake -> 0, halved as in the paper to slow D down."""

    def __init__(self, D_A, D_B):
        super().__init__()
        self.D_A, self.D_B = D_A, D_B

    def forward(self, real_A, real_B, fake_A, fake_B):
        loss_D_A = 0.5 * (lsgan(self.D_A(real_A), 1.0) + lsgan(self.D_A(fake_A), 0.0))
        loss_D_B = 0.5 * (lsgan(self.D_B(real_B), 1.0) + lsgan(self.D_B(fake_B), 0.0))
        return loss_D_A, loss_D_B


def translations(G, x, y, identity):
    """(G(x), G(y) for the identity loss or None), from one batched pass: InstanceNorm keeps the samples
    independent."""
    if not identity:
        return G(x), None
    return G(torch.cat([x, y])).chunk(2)


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
