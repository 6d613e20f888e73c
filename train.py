"""Train CycleGAN (Zhu et al., 2017) on an unpaired two-domain data set.

    python train.py --dataroot datasets/summer2winter_yosemite --cuda
    python train.py --resume                  # continue output/checkpoint.pth exactly where it stopped
    torchrun --nproc_per_node=4 train.py --dataroot datasets/summer2winter_yosemite --cuda   # 4 GPUs, DDP

Reading order: main() is the run's outline; train_step() is the paper's update; run_state.Run is what a checkpoint
holds, with checkpoint() and restore() side by side; stopping.Stopper is where a run stops on Ctrl-C;
epoch_end.EpochEnd is what each epoch end leaves on disk besides the checkpoint, in an order a resumed run finishes.
"""

import argparse
import functools
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import (
    choose_output_dir,
    load_checkpoint,
    lock_output_dir,
    resume_command,
    resume_path,
    typed_flags,
)
from cuda_graph import CudaGraphStep
from datasets import ImageDataset, object_masks, skipped_summary, test_images, train_loader
from epoch_end import EpochEnd
from files import copy_histories, remove_leftovers
from losses import AttentionLoss, DiscriminatorLoss, GeneratorLoss
from models import check_map_design, max_scales
from report import MapProbe, run_logger
from run_state import CHECKPOINT_TYPES, build, restore, save_checkpoint, steps_per_epoch
from runtime import (
    chosen_device,
    device_features,
    setup_processes,
    to_device,
)
from stopping import Stopper, before_exit
from utils import UserError, cannot_write, channels_problem, first_line, set_requires_grad

LOSS_NAMES = ["loss_G", "loss_G_identity", "loss_G_GAN", "loss_G_cycle", "loss_D", "loss_D_A", "loss_D_B"]
MAP_NAMES = ["loss_map", "map_A", "map_B"]  # --attention: the maps' loss and their means (0 keeps, 1 translates)
STOPPED_WAIT = 5  # seconds a stopped run waits for its last redraw, which then finishes on its own
MAX_SIZE = 2048  # --size: 8x the paper's 256 px crops, already ~64x its memory
PROBE_IMAGES = 32  # --mask_dir: test images whose maps losses.csv follows (cropped to --size)


def get_parser():
    """train.py's flags, in the groups that --help shows them in; the defaults are the paper's."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p.add_argument_group("data and networks"))
    add_training_flags(p.add_argument_group("training (the paper's values)"))
    add_compute_flags(p.add_argument_group("where and how it computes"))
    add_output_flags(p.add_argument_group("saving, resuming and watching"))
    return p


def add_data_flags(g):
    """The data set, the crops and the networks' shapes (architecture flags: fixed for a run)."""
    g.add_argument(
        "--dataroot", type=str, default="datasets/summer2winter_yosemite/", help="root directory of the dataset"
    )
    g.add_argument("--size", type=int, default=256, help="size of the (square) training crops")
    g.add_argument("--load_size", type=int, help="shorter side before the random --size crop (1.12 * size)")
    g.add_argument("--input_nc", type=int, default=3, help="number of channels of input data")
    g.add_argument("--output_nc", type=int, default=3, help="number of channels of output data")
    g.add_argument(
        "--n_blocks", type=int, default=9, help="residual blocks per generator (the authors use 6 up to 128 px)"
    )
    g.add_argument(
        "--d_scales", type=int, default=1, help="PatchGANs per discriminator, on the input pooled 0..K-1 times"
    )
    g.add_argument("--attention", action="store_true", help="generators that also output where to translate (a map)")
    g.add_argument(
        "--mask_dir",
        type=str,
        help="--attention: masks of test/A's images (black: to keep); losses.csv logs the map on and off them",
    )


def add_training_flags(g):
    """The losses, the optimiser and its schedule, the epochs."""
    g.add_argument(
        "--epoch", type=int, default=0, help="starting epoch of a new run's schedule (docs/training.md: resuming)"
    )
    g.add_argument("--n_epochs", type=int, default=200, help="number of epochs of training")
    g.add_argument(
        "--decay_epoch", type=int, default=100, help="epoch to start linearly decaying the learning rate to 0"
    )
    g.add_argument("--batchSize", type=int, default=1, help="size of the batches (per process under torchrun)")
    g.add_argument("--lr", type=float, default=0.0002, help="initial learning rate")
    g.add_argument("--lambda_cycle", type=float, default=10.0, help="weight of the cycle loss, per direction")
    g.add_argument(
        "--lambda_identity", type=float, default=0.5, help="identity loss weight, as a fraction of lambda_cycle"
    )
    g.add_argument("--lambda_tv", type=float, default=0.1, help="--attention: weight of the maps' total variation")
    g.add_argument(
        "--lambda_sparsity",
        type=float,
        default=0.3,
        help="--attention: weight of the maps' mean, a pull towards keeping the input; below 0, against maps of 0",
    )
    g.add_argument(
        "--pool_size", type=int, default=50, help="fakes kept in each discriminator's replay buffer (0: none)"
    )
    g.add_argument("--seed", type=int, help="random seed (default: a random one, printed and saved)")


def add_compute_flags(g):
    """Device, data loading and precision: the numbers stay the run's."""
    g.add_argument("--device", type=str, help="where to train: cpu, cuda, cuda:N or mps (default: cpu)")
    g.add_argument("--cuda", action="store_true", help="use GPU computation (the seed's flag: --device cuda)")
    g.add_argument("--n_cpu", type=int, default=8, help="number of cpu threads to use during batch generation")
    g.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision: bfloat16 where the device has it, float16 with loss scaling on older GPUs",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic GPU kernels: a --seed run, and its resumption, repeat bit for bit (slower)",
    )
    g.add_argument("--no_deterministic", dest="deterministic", action="store_false", help="on a resume: turn it off")
    g.add_argument("--eager", action="store_true", help="on CUDA, run the step op by op instead of as one CUDA graph")


def add_output_flags(g):
    """Checkpoints, visdom, sample sheets, FID/KID and figures."""
    g.add_argument("--output_dir", type=str, default="output", help="where checkpoints and losses.csv go")
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="PATH",
        help="continue OUTPUT_DIR/checkpoint.pth, or PATH in its own folder (with --output_dir D: a copy in D)",
    )
    g.add_argument(
        "--save_freq", type=int, default=1000, help="also checkpoint every this many steps (0: epoch ends only)"
    )
    g.add_argument("--display_server", type=str, default="http://localhost", help="visdom server")
    g.add_argument("--display_port", type=int, default=8097, help="visdom port")
    g.add_argument("--display_env", type=str, help="visdom environment (default: DATASET_OUTPUTDIR)")
    g.add_argument("--display_freq", type=int, default=100, help="steps between loss rows, progress lines and plots")
    g.add_argument("--no_visdom", action="store_true", help="do not plot to visdom (losses.csv is still written)")
    g.add_argument("--visdom", dest="no_visdom", action="store_false", help="on a resume: plot to visdom again")
    g.add_argument("--n_samples", type=int, default=4, help="test images per domain drawn at each epoch end (samples/)")
    g.add_argument(
        "--eval_freq",
        type=int,
        default=0,
        help="FID and KID of the test split every this many epochs and at the last, into metrics.csv (0: off)",
    )
    g.add_argument(
        "--keep_best",
        action="store_true",
        help="with --eval_freq: also keep the generators of the epoch of lowest FID (A2B + B2A) as best_netG_*.pth",
    )
    g.add_argument("--no_keep_best", dest="keep_best", action="store_false", help="on a resume: stop keeping them")
    g.add_argument("--fid_weights", type=str, metavar="PATH", help="a local Inception weights file")
    g.add_argument(
        "--no_figures",
        action="store_true",
        help="do not redraw plots/ and training.html at epoch ends (python figures.py OUTPUT_DIR draws them any time)",
    )
    g.add_argument("--figures", dest="no_figures", action="store_false", help="on a resume: redraw them again")


def check_args(args, resuming=False):
    """UserError naming the first flag whose value cannot work, and what would."""
    if args.n_epochs < 1 or not 0 <= args.decay_epoch < args.n_epochs:
        raise UserError(f"--decay_epoch ({args.decay_epoch}) must be at least 0 and below --n_epochs ({args.n_epochs})")
    if args.epoch < 0 or (not resuming and args.epoch >= args.n_epochs):
        raise UserError(
            f"--epoch {args.epoch}: a new run starts at an epoch from 0 to --n_epochs - 1 "
            f"({args.n_epochs - 1}); to continue a run use --resume"
        )
    if not 24 <= args.size <= MAX_SIZE or args.size % 4:
        raise UserError(
            f"--size {args.size}: the generator needs a multiple of 4, the discriminator at least 24, "
            f"and memory grows with its square: at most {MAX_SIZE} (the paper trains at 256)"
        )
    if not math.isfinite(args.lambda_sparsity):  # either sign: docs/experiments.md measured both
        raise UserError(f"--lambda_sparsity {args.lambda_sparsity}: must be a finite number")
    for flag in ("lr", "lambda_cycle", "lambda_identity", "lambda_tv"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0 or (flag == "lr" and value == 0):
            raise UserError(
                f"--{flag} {value}: must be a finite number "
                + ("above 0 (the paper's is 0.0002)" if flag == "lr" else "of 0 or more")
            )
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UserError(f"--seed {args.seed}: must be a whole number from 0 to 2**63 - 1")
    if channels_problem(args):
        raise UserError(channels_problem(args))
    if not 0 < args.display_port < 65536:
        raise UserError(f"--display_port {args.display_port}: a port is a number from 1 to 65535")
    if args.input_nc != args.output_nc and args.lambda_identity > 0:
        raise UserError(
            "the identity loss feeds B images to G_A2B, so it needs --input_nc == --output_nc; pass --lambda_identity 0"
        )
    if not (most := max_scales(args.size)) >= args.d_scales >= 1:  # the coarsest scale must see the PatchGAN's 24 px
        raise UserError(f"--d_scales {args.d_scales}: at --size {args.size} from 1 to {most} scales fit")
    if args.load_size is not None and not args.size <= args.load_size <= MAX_SIZE:
        raise UserError(f"--load_size {args.load_size}: from --size ({args.size}) to {MAX_SIZE}")
    if args.n_blocks > 64:  # the paper has 9; each costs 2.4 MB of weights and a full-size activation per image
        raise UserError(f"--n_blocks {args.n_blocks}: at most 64 residual blocks (the paper uses 9, or 6 up to 128 px)")
    if (
        min(args.batchSize, args.display_freq, args.n_blocks) < 1
        or min(args.save_freq, args.pool_size, args.n_cpu, args.n_samples, args.eval_freq) < 0
    ):
        raise UserError(
            "--batchSize, --display_freq and --n_blocks must be positive, --save_freq, --pool_size, "
            "--n_cpu, --n_samples and --eval_freq at least 0"
        )
    if (args.keep_best or args.fid_weights) and not args.eval_freq:
        raise UserError("--keep_best and --fid_weights go with --eval_freq K (FID and KID every K epochs)")
    if args.fid_weights and not Path(args.fid_weights).is_file():
        raise UserError(f"--fid_weights {args.fid_weights} is not a file: pass the Inception weights file")
    if args.mask_dir is not None and not args.attention:
        raise UserError("--mask_dir measures the attention maps of an --attention run: add --attention, or leave it")
    if args.mask_dir is not None and not Path(args.mask_dir).is_dir():
        raise UserError(f"--mask_dir {args.mask_dir} is not a folder: pass a folder of masks named as test/A's images")


def train_step(
    g_loss,
    d_loss,
    discriminators,
    optimizer_G,
    optimizer_D,
    scaler,
    autocast,
    buffers,
    real_A,
    real_B,
    choices_A,
    choices_B,
    names=LOSS_NAMES,
):
    """One CycleGAN update: both generators, then both discriminators. Returns the losses as one tensor in
    loss_names(args) order, and (fake_A, fake_B, rec_A, rec_B). No host sync inside: CUDA can replay it as one graph.

    choices_*: the replay buffers' draws for this batch (ReplayBuffer.draw), made before the step."""
    D_A, D_B = discriminators
    fake_A_buffer, fake_B_buffer = buffers

    # ---- Generators: minimise GAN + lambda_cycle * cycle + lambda_cycle * lambda_identity * identity, D frozen ----
    # (--attention: + the maps' loss_map, losses.AttentionLoss)
    set_requires_grad(discriminators, False)
    optimizer_G.zero_grad(set_to_none=True)
    with autocast:
        (loss_G, terms_G), (fake_A, fake_B, rec_A, rec_B) = g_loss(real_A, real_B, D_A, D_B)
    scaler.scale(loss_G).backward()
    scaler.step(optimizer_G)

    # ---- Discriminators: minimise 0.5 * [(D(real) - 1)^2 + D(fake)^2], the fakes through the replay buffers ----
    set_requires_grad(discriminators, True)
    optimizer_D.zero_grad(set_to_none=True)
    with autocast:
        loss_D_A, loss_D_B = d_loss(
            real_A, real_B, fake_A_buffer.push_and_pop(fake_A, choices_A), fake_B_buffer.push_and_pop(fake_B, choices_B)
        )
        loss_D = loss_D_A + loss_D_B
    scaler.scale(loss_D).backward()
    scaler.step(optimizer_D)
    scaler.update()

    losses = {"loss_G": loss_G, **terms_G, "loss_D": loss_D, "loss_D_A": loss_D_A, "loss_D_B": loss_D_B}
    # Detached: an output with its grad_fn would keep parts of this step's graph alive through the next step.
    images = tuple(x.detach() for x in (fake_A, fake_B, rec_A, rec_B))
    return torch.stack([losses[name].detach().float() for name in names]), images


def make_step(run, args, ddp=False):
    """train_step bound to the run (losses in DDP under torchrun): a function of (real_A, real_B, choices_A,
    choices_B)."""
    G_A2B, G_B2A, D_A, D_B = run.nets.values()
    g_loss = (
        AttentionLoss(G_A2B, G_B2A, args.lambda_cycle, args.lambda_identity, args.lambda_tv, args.lambda_sparsity)
        if args.attention
        else GeneratorLoss(G_A2B, G_B2A, args.lambda_cycle, args.lambda_identity)
    )
    d_loss = DiscriminatorLoss(D_A, D_B)
    if ddp:  # each wrapped forward computes a whole loss: no network runs twice inside one DDP forward-backward
        g_loss, d_loss = DDP(g_loss), DDP(d_loss)
    return functools.partial(
        train_step,
        g_loss,
        d_loss,
        (D_A, D_B),
        run.optimizer_G,
        run.optimizer_D,
        run.scaler,
        run.autocast,
        run.buffers,
        names=loss_names(args),
    )


def loss_names(args):
    """The columns of losses.csv, in the order train_step returns them."""
    return LOSS_NAMES[:4] + MAP_NAMES + LOSS_NAMES[4:] if args.attention else LOSS_NAMES


def main(args, typed=frozenset()):
    """A run, top to bottom: set up, build, restore if resuming, train epoch by epoch, finish. typed: the flags the
    command line gave (checkpoints.typed_flags), which a resume honours or refuses; none: resume as saved."""
    device = chosen_device(args)  # before anything is written
    is_main = int(os.environ.get("RANK", 0)) == 0
    _, lock, ckpt = open_output(args, typed, is_main)  # lock: held until exit
    world = setup_processes(args, device)
    log = print if world.is_main else (lambda *a, **k: None)

    # ---- Build: data, networks, optimizers, schedules, precision, replay buffers; a checkpoint put into them ----
    dataset = open_dataset(args, log)
    run = build(args, world.device, world.rank, epoch_size=len(dataset))
    if args.amp and run.dtype is None:
        cpu = "no bfloat16 units on this CPU (AVX512-BF16 or AMX; emulated, 3x slower)"
        log(f"--amp: {'not on MPS' if run.device.type == 'mps' else cpu}: training runs in float32")
    try:
        saved_ranks = restore(run, ckpt, args, world.rank, world.size) if ckpt is not None else None
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # a damaged or foreign file
        raise UserError(
            f"{resume_path(args)} does not fit these networks ({type(e).__name__}: "
            f"{first_line(e)[:200]}): is it a checkpoint of train.py?"
        ) from None
    if ckpt is not None and run.sample >= run.epoch_size:
        log(end_of_epoch_past_the_data(run))
    done = run.epoch >= args.n_epochs  # resumed once more: the last epoch end is finished, nothing is trained
    if not done:
        log(start_line(run, ckpt, args, world, saved_ranks))

    # ---- The step: one function; DDP wraps its two losses, CUDA replays it as one graph ----
    eager_step = make_step(run, args, world.ddp)
    features = device_features(world.device)
    capture = features.graphs and not (args.eager or world.ddp or run.scaler.is_enabled())
    fast_step = CudaGraphStep(eager_step) if capture else eager_step  # a smaller last batch runs eagerly
    if features.graphs and not capture and not done:
        log("the step runs eagerly: " + ("--eager" if args.eager else "DDP" if world.ddp else "float16 loss scaling"))
    loader = train_loader(dataset, args.batchSize, args.n_cpu, features.pin_memory, args.seed, world.rank, world.size)
    probe = map_probe(args, run) if args.mask_dir and world.is_main else None
    total_steps = steps_per_epoch(run, args, world.size) * args.n_epochs
    logger = run_logger(args, world, loss_names(args), total_steps, run, probe)
    stopper = Stopper(world.control, world.rank)  # Ctrl-C / SIGTERM: finish the step, save, exit
    at_epoch_end = ckpt is not None and run.epoch > 0 and run.sample == 0
    epoch_end = EpochEnd(args, ckpt and run.epoch, world.device, at_epoch_end) if world.is_main else None
    if epoch_end and at_epoch_end:  # resumed at an epoch end: finish what a kill cut short
        epoch_end(run, logger)

    # ---- The epochs: each ends with a checkpoint, then (rank 0) generators, samples, FID/KID, figures ----
    stopped, saved = False, True
    for _ in range(run.epoch, args.n_epochs):
        stopped, saved = train_epoch(run, args, world, loader, (fast_step, eager_step), logger, stopper, epoch_end)
        if stopped:
            break
        if world.is_main:
            epoch_end(run, logger)
    logger.close()
    try:  # the last word first: a scheduler that sent SIGTERM gives a stopped run a short grace period
        finish(run, args, world, stopped, saved, done)
    finally:
        if epoch_end:
            epoch_end.close(STOPPED_WAIT if stopped else 60)  # the figures of a stopped run too
    return 0


def open_output(args, typed, is_main):
    """OUTPUT_DIR chosen, made and locked (rank 0); the checkpoint to resume from, or None, its flags merged into
    args (typed: the flags the command line gave). A run branched from another folder starts with its histories."""
    choose_output_dir(args, typed)
    out = Path(args.output_dir)
    lock = lock_output_dir(out) if is_main and out.is_dir() else None
    ckpt = load_checkpoint(args, typed, get_parser(), CHECKPOINT_TYPES)
    if ckpt is not None and args.attention:
        check_map_design(ckpt["G_A2B"], resume_path(args))
    check_args(args, resuming=ckpt is not None)  # after the merge: a resumed run's flags with what was typed anew
    try:
        out.mkdir(parents=True, exist_ok=True)
        if is_main:
            for folder in (out, out / "samples"):  # plots/: figures.py's own
                remove_leftovers(folder)
        if is_main and ckpt is not None:
            copy_histories(resume_path(args).parent, out)
    except OSError as e:
        raise UserError(cannot_write(out, e)) from None
    return out, lock or (lock_output_dir(out) if is_main else None), ckpt


def open_dataset(args, log):
    """The training split; files that cannot be images are left out, and named."""
    try:
        dataset = ImageDataset(
            args.dataroot, args.size, args.input_nc, args.output_nc, seed=args.seed, load_size=args.load_size
        )
    except ValueError as e:
        raise UserError(e) from None
    if dataset.skipped:
        log(skipped_summary(dataset.skipped), file=sys.stderr)
    return dataset


def map_probe(args, run):
    """--mask_dir: G_A2B's map on the first PROBE_IMAGES test/A images that have a mask, for losses.csv."""
    images, paths = test_images(args.dataroot, "A", args.input_nc, PROBE_IMAGES, args.size)
    masks, kept = object_masks(args.mask_dir, paths, args.size)
    if not kept or masks.all() or not masks.any():
        raise UserError(
            f"--mask_dir {args.mask_dir}: no readable mask named as one of the first {PROBE_IMAGES} images of "
            f"{Path(args.dataroot) / 'test' / 'A'}, or none with both black (the object to keep) and white"
        )
    real = torch.stack([images[i] for i in kept]).to(run.device, memory_format=run.memory_format)
    return MapProbe(run.nets["G_A2B"], real, masks.to(run.device))


def start_line(run, ckpt, args, world, saved_ranks):
    """What starts: a resumed run (and what a new number of processes changes), or a new one."""
    if ckpt is None and args.epoch:
        return (
            f"--epoch {args.epoch}: a NEW run whose learning-rate schedule starts at epoch {args.epoch}; to continue "
            f"a run use --resume"
        )
    if ckpt is None:
        return f"new run, seed {args.seed}, {world.size} processes" if world.ddp else f"new run, seed {args.seed}"
    line = f"resuming from epoch {run.epoch + 1}, step {run.step} (seed {args.seed})"
    if saved_ranks != world.size:
        line = (
            f"the run had {saved_ranks} process(es), this one has {world.size}: ranks beyond the run's start with "
            f"empty replay buffers, and each epoch now takes {steps_per_epoch(run, args, world.size)} steps\n{line}"
        )
    return line


def end_of_epoch_past_the_data(run):
    """A resume on a smaller --dataroot whose saved position is past the data's end: that epoch is over (an epoch of
    no steps would never end), its lr schedule steps as at an epoch end, and the next epoch starts. The line to say."""
    line = (
        f"the checkpoint stopped at sample {run.sample} of epoch {run.epoch + 1}, past this --dataroot's "
        f"{run.epoch_size}: epoch {run.epoch + 1} ends here"
    )
    run.epoch, run.sample = run.epoch + 1, 0
    run.lr_scheduler_G.step()
    run.lr_scheduler_D.step()
    return line


def train_epoch(run, args, world, loader, steps, logger, stopper, epoch_end=None):
    """Train to the epoch's end or a stop, checkpointing there and every --save_freq steps; (stopped, last save ok)."""
    fast_step, eager_step = steps
    epoch, start, per_epoch = run.epoch, run.sample, steps_per_epoch(run, args, world.size)
    loader.sampler.set_epoch(epoch, start)
    n_steps = len(loader)  # this epoch's steps from here on, the same on every rank
    logger.begin_epoch(epoch, args.n_epochs, per_epoch - n_steps, per_epoch)
    stopped, saved = False, True
    for i, batch in enumerate(loader, 1):
        logger.report_bad(batch["bad"])
        real_A, real_B, choices_A, choices_B = to_device(batch, run.buffers, run.device, run.memory_format)
        step = fast_step if len(real_A) == args.batchSize else eager_step
        losses, (fake_A, fake_B, rec_A, rec_B) = step(real_A, real_B, choices_A, choices_B)
        logger.step(losses)
        at_end = i == n_steps
        run.step += 1
        run.epoch, run.sample = (epoch + 1, 0) if at_end else (epoch, start + i * args.batchSize * world.size)
        stopped = stopper()
        save_now = at_end or stopped or (args.save_freq and run.step % args.save_freq == 0)
        if run.step % args.display_freq == 0 or save_now:
            images = dict(
                real_A=real_A[0], fake_B=fake_B[0], rec_A=rec_A[0], real_B=real_B[0], fake_A=fake_A[0], rec_B=rec_B[0]
            )
            try:  # checks every loss is finite, before anything is saved
                logger.flush(
                    run.step,
                    run.epoch + run.sample / run.epoch_size,
                    args.lr * run.lr_lambda(run.lr_scheduler_G.last_epoch),
                    images,
                )
            except FloatingPointError as e:
                logger.close()
                ckpt = Path(args.output_dir) / "checkpoint.pth"
                kept = f"{ckpt} holds the last good state" if ckpt.exists() else "no checkpoint had been written yet"
                raise UserError(f"{e}; stopped without saving: {kept} (try a lower --lr, or drop --amp)") from None
        if at_end:
            run.lr_scheduler_G.step()
            run.lr_scheduler_D.step()
        if save_now:
            if epoch_end and (stopped or run.epoch == args.n_epochs):  # the run's last: redrawn on the core that
                epoch_end.figures(run)  # the checkpoint's write leaves idle, not after the sheet (close() waits)
            run.seconds = logger.seconds()
            saved = save_checkpoint(run, args, world)
        if stopped:
            break
    logger.end_epoch()
    return stopped, saved


def finish(run, args, world, stopped, saved, done=False):
    """The run's last word: where its generators are, or how to continue it (done: all epochs were done before)."""
    out = Path(args.output_dir)
    if not saved:
        raise UserError(
            f"the last checkpoint could not be written; free space in {out} and run: {resume_command(args)}"
        )
    if world.is_main:
        print(
            f"all {args.n_epochs} epochs of this run are done ({run.step} steps); to train longer, resume with a "
            f"larger --n_epochs"
            if done
            else f"stopped at step {run.step}; continue with:\n  {resume_command(args)}"
            if stopped
            else f"done: {args.n_epochs} epochs, {run.step} steps; generators in {out}/netG_A2B.pth and netG_B2A.pth"
        )
    if world.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        code = main(get_parser().parse_args(), typed_flags(get_parser()))
    except UserError as e:
        code = f"error: {e}"
    except torch.cuda.OutOfMemoryError:
        code = "error: out of GPU memory: use a smaller --batchSize or --size (or --amp)"
    finally:
        before_exit()
    sys.exit(code)
