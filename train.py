"""Train CycleGAN (Zhu et al., 2017) on an unpaired two-domain data set.

    python train.py --dataroot datasets/summer2winter_yosemite --cuda
    python train.py --resume                  # continue output/checkpoint.pth exactly where it stopped
"""
import argparse
import contextlib
import math
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from datasets import EpochSampler, ImageDataset, new_bad_files, skipped_summary
from models import Discriminator, Generator, weights_init_normal
from utils import (Logger, ReplayBuffer, VisdomPlotter, atomic_save, linear_decay, rng_state, seed_everything,
                   set_requires_grad, set_rng_state, unwrap)

LOSS_NAMES = ["loss_G", "loss_G_identity", "loss_G_GAN", "loss_G_cycle", "loss_D", "loss_D_A", "loss_D_B"]
# On --resume: flags left at their default take the run's saved value, except where to run (MACHINE_FLAGS);
# RUN_FLAGS may be given a new value; any other flag given with a new value is refused.
MACHINE_FLAGS = {"cuda", "n_cpu", "output_dir", "resume"}
RUN_FLAGS = {"epoch", "n_epochs", "decay_epoch", "dataroot", "save_freq",
             "display_server", "display_port", "display_env", "display_freq", "no_visdom"}
ARCH_FLAGS = {"input_nc", "output_nc"}


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback."""


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epoch", type=int, default=0, help="starting epoch (see README: resuming)")
    p.add_argument("--n_epochs", type=int, default=200, help="number of epochs of training")
    p.add_argument("--batchSize", type=int, default=1, help="size of the batches")
    p.add_argument("--dataroot", type=str, default="datasets/summer2winter_yosemite/", help="root directory of the dataset")
    p.add_argument("--lr", type=float, default=0.0002, help="initial learning rate")
    p.add_argument("--decay_epoch", type=int, default=100, help="epoch to start linearly decaying the learning rate to 0")
    p.add_argument("--size", type=int, default=256, help="size of the (square) training crops")
    p.add_argument("--input_nc", type=int, default=3, help="number of channels of input data")
    p.add_argument("--output_nc", type=int, default=3, help="number of channels of output data")
    p.add_argument("--cuda", action="store_true", help="use GPU computation")
    p.add_argument("--n_cpu", type=int, default=8, help="number of cpu threads to use during batch generation")
    p.add_argument("--output_dir", type=str, default="output", help="where checkpoints and losses.csv go")
    p.add_argument("--lambda_cycle", type=float, default=10.0, help="weight of the cycle loss, per direction")
    p.add_argument("--lambda_identity", type=float, default=0.5, help="identity loss weight, as a fraction of lambda_cycle")
    p.add_argument("--pool_size", type=int, default=50, help="fakes kept in each discriminator's replay buffer")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed and saved)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on GPU, bfloat16 on CPU)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from OUTPUT_DIR/checkpoint.pth, or from PATH")
    p.add_argument("--save_freq", type=int, default=1000, help="also checkpoint every this many steps (0: epoch ends only)")
    p.add_argument("--display_server", type=str, default="http://localhost", help="visdom server")
    p.add_argument("--display_port", type=int, default=8097, help="visdom port")
    p.add_argument("--display_env", type=str, default=None, help="visdom environment (default: DATASET_OUTPUTDIR)")
    p.add_argument("--display_freq", type=int, default=100, help="steps between loss rows, progress lines and plots")
    p.add_argument("--no_visdom", action="store_true", help="do not plot to visdom (losses.csv is still written)")
    return p


def check_args(args):
    if args.n_epochs < 1 or not 0 <= args.decay_epoch < args.n_epochs:
        raise UserError(f"--decay_epoch ({args.decay_epoch}) must be at least 0 and below --n_epochs ({args.n_epochs})")
    if args.size < 24 or args.size % 4:
        raise UserError(f"--size {args.size}: the generator needs a multiple of 4 and the discriminator at least 24")
    if args.input_nc != args.output_nc and args.lambda_identity > 0:
        raise UserError("the identity loss feeds B images to G_A2B, so it needs --input_nc == --output_nc; "
                        "pass --lambda_identity 0")
    if args.cuda and not torch.cuda.is_available():
        raise UserError("--cuda was given but PyTorch sees no CUDA GPU; drop --cuda to train on the CPU")
    if args.batchSize < 1 or args.display_freq < 1 or args.save_freq < 0:
        raise UserError("--batchSize and --display_freq must be positive, --save_freq at least 0")


def load_checkpoint(args):
    """The checkpoint to resume from (or None), with args merged: the run's flags unless given anew here."""
    path = Path(args.output_dir) / "checkpoint.pth" if args.resume in (None, "latest") else Path(args.resume)
    if args.resume is None:
        for existing in (path, path.with_name("netG_A2B.pth")):
            if existing.exists():
                raise UserError(f"{existing} holds a run already: continue it with --resume, "
                                f"or pick another --output_dir")
        return None
    if not path.exists():
        raise UserError(f"no checkpoint at {path} to resume from" + (" (pass --output_dir of the run, or --resume PATH)"
                                                                    if args.resume == "latest" else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt["args"]
    except Exception as e:
        raise UserError(f"{path} is not a checkpoint of train.py ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    defaults = vars(get_parser().parse_args([]))
    given = {k for k, v in vars(args).items() if v != defaults[k]}
    changed = {k for k in given - RUN_FLAGS - MACHINE_FLAGS if k in saved and getattr(args, k) != saved[k]}
    if changed:
        kind = "architecture" if changed & ARCH_FLAGS else "training"
        raise UserError(f"{path} was trained with other {kind} flags: " +
                        ", ".join(f"--{k} {saved[k]} (given {getattr(args, k)})" for k in sorted(changed)) +
                        "; drop them to resume, or start a new run in another --output_dir")
    for k in saved.keys() & defaults.keys() - given - MACHINE_FLAGS:
        setattr(args, k, saved[k])
    return ckpt


def main(args):
    ckpt = load_checkpoint(args)
    check_args(args)  # after the merge: a resumed run's flags with what was given anew
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if args.cuda else "cpu")
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    seed_everything(args.seed)

    # ---- Networks, optimizers, schedules ----
    G_A2B, G_B2A = Generator(args.input_nc, args.output_nc).to(device), Generator(args.output_nc, args.input_nc).to(device)
    D_A, D_B = Discriminator(args.input_nc).to(device), Discriminator(args.output_nc).to(device)
    for net in (G_A2B, G_B2A, D_A, D_B):
        net.apply(weights_init_normal)
    optimizer_G = torch.optim.Adam([*G_A2B.parameters(), *G_B2A.parameters()], lr=args.lr, betas=(0.5, 0.999))
    optimizer_D = torch.optim.Adam([*D_A.parameters(), *D_B.parameters()], lr=args.lr, betas=(0.5, 0.999))
    fake_A_buffer, fake_B_buffer = ReplayBuffer(args.pool_size, args.seed), ReplayBuffer(args.pool_size, args.seed + 1)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    autocast = torch.autocast(device.type, amp_dtype) if args.amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    try:
        dataset = ImageDataset(args.dataroot, args.size, args.input_nc, args.output_nc, seed=args.seed)
    except ValueError as e:
        raise UserError(e) from None
    if dataset.skipped:
        print(skipped_summary(dataset.skipped), file=sys.stderr)
    seen_bad = set()  # files that failed to decode, each reported once (workers cannot know what others saw)
    steps_per_epoch = math.ceil(len(dataset) / args.batchSize)
    step, start_epoch, seconds = 0, args.epoch, 0.0
    if ckpt is not None:
        for net, key in ((G_A2B, "G_A2B"), (G_B2A, "G_B2A"), (D_A, "D_A"), (D_B, "D_B")):
            net.load_state_dict(ckpt[key])
        optimizer_G.load_state_dict(ckpt["optimizer_G"])
        optimizer_D.load_state_dict(ckpt["optimizer_D"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        fake_A_buffer.load_state_dict(ckpt["fake_A_buffer"], device)
        fake_B_buffer.load_state_dict(ckpt["fake_B_buffer"], device)
        set_rng_state(ckpt["rng"])
        step, seconds = ckpt["step"], ckpt["seconds"]
        start_epoch = step // steps_per_epoch
        if start_epoch >= args.n_epochs:
            print(f"all {args.n_epochs} epochs of this run are done ({step} steps); "
                  f"to train longer, resume with a larger --n_epochs")
            return 0
        print(f"resuming from epoch {start_epoch + 1}, step {step} (seed {args.seed})")
    elif args.epoch:
        print(f"--epoch {args.epoch}: a NEW run whose learning-rate schedule starts at epoch {args.epoch}; "
              f"to continue a run use --resume")
    else:
        print(f"new run, seed {args.seed}")
    for group in optimizer_G.param_groups + optimizer_D.param_groups:
        group["initial_lr"] = args.lr
    lr_lambda = linear_decay(args.n_epochs, args.decay_epoch)
    lr_scheduler_G = torch.optim.lr_scheduler.LambdaLR(optimizer_G, lr_lambda, last_epoch=start_epoch - 1)
    lr_scheduler_D = torch.optim.lr_scheduler.LambdaLR(optimizer_D, lr_lambda, last_epoch=start_epoch - 1)
    if ckpt is not None:
        lr_scheduler_G.load_state_dict(ckpt["lr_scheduler_G"])
        lr_scheduler_D.load_state_dict(ckpt["lr_scheduler_D"])

    sampler = EpochSampler(len(dataset), args.seed)
    # Workers ignore Ctrl-C / SIGTERM so the main process can finish its step and save; their own
    # generator keeps the loader from drawing on the global torch RNG.
    loader = DataLoader(dataset, batch_size=args.batchSize, sampler=sampler, num_workers=args.n_cpu,
                        pin_memory=args.cuda, worker_init_fn=ignore_signals, generator=torch.Generator())
    env = args.display_env or f"{Path(args.dataroot.rstrip('/')).name}_{out.resolve().name}"
    plotter = None if args.no_visdom else VisdomPlotter(args.display_server, args.display_port, env, LOSS_NAMES)
    logger = Logger(out, LOSS_NAMES, args.batchSize, steps_per_epoch * args.n_epochs, step, seconds, plotter)

    def save_checkpoint():
        """Everything the run needs to continue bit for bit, in one atomically written file; False if it failed."""
        state = {"G_A2B": unwrap(G_A2B).state_dict(), "G_B2A": unwrap(G_B2A).state_dict(),
                 "D_A": unwrap(D_A).state_dict(), "D_B": unwrap(D_B).state_dict(),
                 "optimizer_G": optimizer_G.state_dict(), "optimizer_D": optimizer_D.state_dict(),
                 "lr_scheduler_G": lr_scheduler_G.state_dict(), "lr_scheduler_D": lr_scheduler_D.state_dict(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "fake_A_buffer": fake_A_buffer.state_dict(), "fake_B_buffer": fake_B_buffer.state_dict(),
                 "rng": rng_state(), "step": step, "epoch": step / steps_per_epoch,
                 "seconds": logger.seconds(), "args": vars(args)}
        return try_save(state, out / "checkpoint.pth")

    saved, stop = True, []  # SIGINT/SIGTERM: finish the step, save, exit; a second Ctrl-C exits at once

    def request_stop(signum, frame):
        if stop:
            print("quitting without saving", file=sys.stderr)
            raise SystemExit(130)
        stop.append(signal.Signals(signum).name)
        print(f"\n{stop[0]}: stopping after this step (Ctrl-C again to quit without saving)", file=sys.stderr)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    for epoch in range(start_epoch, args.n_epochs):
        done = step - epoch * steps_per_epoch  # steps of this epoch already taken (resuming mid-epoch)
        sampler.set_epoch(epoch, done * args.batchSize)
        logger.begin_epoch(epoch, args.n_epochs, done, steps_per_epoch)
        for batch in loader:
            for line in new_bad_files(batch["bad"], seen_bad):
                print(f"{line}; replaced by another image", file=sys.stderr)
            real_A, real_B = batch["A"].to(device, non_blocking=True), batch["B"].to(device, non_blocking=True)

            # ---- Generators: minimise adversarial + lambda_cycle * cycle + lambda_cycle * lambda_identity * identity ----
            set_requires_grad([D_A, D_B], False)  # no D gradients needed in the G step
            optimizer_G.zero_grad(set_to_none=True)
            with autocast:
                fake_B, idt_B = generate(G_A2B, real_A, real_B, args.lambda_identity > 0)
                fake_A, idt_A = generate(G_B2A, real_B, real_A, args.lambda_identity > 0)
                rec_A, rec_B = G_B2A(fake_B), G_A2B(fake_A)
                pred_fake_B, pred_fake_A = D_B(fake_B), D_A(fake_A)
                loss_GAN_A2B = F.mse_loss(pred_fake_B, torch.ones_like(pred_fake_B))  # LSGAN, per patch
                loss_GAN_B2A = F.mse_loss(pred_fake_A, torch.ones_like(pred_fake_A))
                loss_cycle_ABA = F.l1_loss(rec_A, real_A)
                loss_cycle_BAB = F.l1_loss(rec_B, real_B)
                loss_identity_A = F.l1_loss(idt_A, real_A) if idt_A is not None else real_A.new_zeros(())
                loss_identity_B = F.l1_loss(idt_B, real_B) if idt_B is not None else real_B.new_zeros(())
                loss_G_GAN = loss_GAN_A2B + loss_GAN_B2A
                loss_G_cycle = args.lambda_cycle * (loss_cycle_ABA + loss_cycle_BAB)
                loss_G_identity = args.lambda_cycle * args.lambda_identity * (loss_identity_A + loss_identity_B)
                loss_G = loss_G_GAN + loss_G_cycle + loss_G_identity
            scaler.scale(loss_G).backward()
            scaler.step(optimizer_G)

            # ---- Discriminators: minimise 0.5 * [(D(real) - 1)^2 + D(fake)^2], fakes from the replay buffers ----
            set_requires_grad([D_A, D_B], True)
            optimizer_D.zero_grad(set_to_none=True)
            with autocast:
                loss_D_A = discriminator_loss(D_A, real_A, fake_A_buffer.push_and_pop(fake_A))
                loss_D_B = discriminator_loss(D_B, real_B, fake_B_buffer.push_and_pop(fake_B))
                loss_D = loss_D_A + loss_D_B
            scaler.scale(loss_D).backward()
            scaler.step(optimizer_D)
            scaler.update()

            step += 1
            logger.step({"loss_G": loss_G, "loss_G_identity": loss_G_identity, "loss_G_GAN": loss_G_GAN,
                         "loss_G_cycle": loss_G_cycle, "loss_D": loss_D, "loss_D_A": loss_D_A, "loss_D_B": loss_D_B})
            epoch_end = step % steps_per_epoch == 0
            save_now = epoch_end or stop or (args.save_freq and step % args.save_freq == 0)
            if step % args.display_freq == 0 or save_now:
                images = {"real_A": real_A[0], "fake_B": fake_B[0], "rec_A": rec_A[0],
                          "real_B": real_B[0], "fake_A": fake_A[0], "rec_B": rec_B[0]}
                try:  # checks every loss is finite, before anything is saved
                    logger.flush(step, step / steps_per_epoch, optimizer_G.param_groups[0]["lr"], images)
                except FloatingPointError as e:
                    logger.close()
                    raise UserError(f"{e}; stopped without saving: {out / 'checkpoint.pth'} holds the last good state "
                                    f"(try a lower --lr, or drop --amp)") from None
            if epoch_end:
                lr_scheduler_G.step()
                lr_scheduler_D.step()
            if save_now:
                saved = save_checkpoint()
            if stop:
                break
        logger.end_epoch()
        if stop:
            break
        # The seed's four files, loadable by its code and by test.py.
        for net, name in ((G_A2B, "netG_A2B"), (G_B2A, "netG_B2A"), (D_A, "netD_A"), (D_B, "netD_B")):
            try_save(unwrap(net).state_dict(), out / f"{name}.pth")
    logger.close()
    if not saved:
        raise UserError(f"the last checkpoint could not be written; free space in {out} and run: {resume_command(args)}")
    if stop:
        print(f"stopped at step {step}; continue with:\n  {resume_command(args)}")
    else:
        print(f"done: {args.n_epochs} epochs, {step} steps; generators in {out}/netG_A2B.pth and netG_B2A.pth")
    return 0


def try_save(obj, path):
    """atomic_save that reports a failure (disk full, permissions) instead of raising: the old file stays whole."""
    try:
        atomic_save(obj, path)
        return True
    except OSError as e:
        print(f"could not write {path} ({e}); the previous file is intact", file=sys.stderr)
        return False


def ignore_signals(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def generate(G, x, y, identity):
    """G(x), and G(y) for the identity loss, from one batched pass: InstanceNorm keeps the samples independent."""
    if not identity:
        return G(x), None
    return G(torch.cat([x, y])).chunk(2)


def discriminator_loss(D, real, fake):
    """LSGAN loss of D on every patch: real -> 1, fake -> 0, halved as in the paper to slow D down."""
    pred_real, pred_fake = D(real), D(fake.detach())
    return 0.5 * (F.mse_loss(pred_real, torch.ones_like(pred_real)) + F.mse_loss(pred_fake, torch.zeros_like(pred_fake)))


def resume_command(args):
    return f"python train.py --resume --output_dir {args.output_dir}" + " --cuda" * args.cuda


if __name__ == "__main__":
    try:
        sys.exit(main(get_parser().parse_args()))
    except UserError as e:
        sys.exit(f"error: {e}")
