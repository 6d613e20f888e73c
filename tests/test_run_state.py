"""run_state.Run: checkpoint() and restore() are each other's inverse, for every piece of a run's state; a checkpoint
written by an older train.py (no "position") still resumes at the same place."""

import importlib
import math

import torch

import run_state
from conftest import make_dataset
from datasets import ImageDataset

train = importlib.import_module("train")


def same(a, b, where="checkpoint"):
    """Assert two checkpoint values are equal, tensors bit for bit, naming the first difference."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))} on one side only"
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def trained_run(args, dataset, seed, steps):
    """A Run built with `seed` (weights, replay buffers, global RNG) after `steps` real steps, with a loss scaler on."""
    args.seed = seed
    torch.manual_seed(seed)
    run = train.build(args, torch.device("cpu"), epoch_size=len(dataset))
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # fp32 steps through it: its state moves too
    step = train.make_step(run, args)
    for i in range(steps):
        batch = {k: torch.stack([dataset[(0, i * 2 + j)][k] for j in range(2)]) for k in "AB"}
        step(*train.to_device(batch, run.buffers, run.device, run.memory_format))
    for _ in range(steps):
        run.lr_scheduler_G.step()
        run.lr_scheduler_D.step()
    run.step, run.epoch, run.sample, run.seconds = steps, steps, 2 * steps, 10.0 * steps
    return run


def test_restore_puts_back_every_piece_checkpoint_saves(tmp_path):
    """A fresh run (other seed, no steps) restored from a checkpoint checkpoints to the same dict, key by key; and
    every key differs between the two runs before the restore, so a piece saved but not restored fails here."""
    data = make_dataset(tmp_path / "data", n_A=4, n_B=3, test=False)
    args = train.get_parser().parse_args(
        [
            "--dataroot",
            str(data),
            "--size",
            "32",
            "--n_blocks",
            "1",
            "--pool_size",
            "3",
            "--batchSize",
            "2",
            "--n_epochs",
            "4",
            "--decay_epoch",
            "1",
        ]
    )
    dataset = ImageDataset(data, 32, seed=0)
    saved_run = trained_run(args, dataset, seed=1, steps=2)
    saved = run_state.checkpoint(saved_run, args, [run_state.rank_state(saved_run)])
    fresh = trained_run(args, dataset, seed=2, steps=0)
    before = run_state.checkpoint(fresh, args, [run_state.rank_state(fresh)])
    for key in saved.keys() - {"args", "world_size", "device"}:  # device: checked on resume (check_device), not state
        try:
            same(saved[key], before[key])
        except AssertionError:
            continue
        raise AssertionError(f"{key!r} is the same in a trained and a fresh run: the round trip cannot test it")
    assert train.restore(fresh, saved, args) == 1
    same(saved, run_state.checkpoint(fresh, args, [run_state.rank_state(fresh)]))
    assert fresh.optimizer_G.param_groups[0]["lr"] == saved_run.optimizer_G.param_groups[0]["lr"] < args.lr


def test_an_older_checkpoint_without_position_resumes_at_its_step(tmp_path):
    """Before DDP a checkpoint counted steps of one process: step 5 of 2-image batches over 4 images is epoch 2,
    sample 2."""
    data = make_dataset(tmp_path / "data", n_A=4, n_B=3, test=False)
    args = train.get_parser().parse_args(
        ["--dataroot", str(data), "--size", "32", "--n_blocks", "1", "--batchSize", "2"]
    )
    dataset = ImageDataset(data, 32, seed=0)
    run = trained_run(args, dataset, seed=1, steps=1)
    run.step = 5
    ckpt = run_state.checkpoint(run, args, [run_state.rank_state(run)])
    del ckpt["position"]
    fresh = train.build(args, torch.device("cpu"), epoch_size=len(dataset))
    train.restore(fresh, ckpt, args)
    assert (fresh.step, fresh.epoch, fresh.sample) == (5, 5 // math.ceil(4 / 2), 2)
