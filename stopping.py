"""How a run stops: Ctrl-C or SIGTERM finish the step and save, torchrun's ranks stop together, and the process
exits without waiting on its loader's workers."""

import gc
import multiprocessing
import os
import signal
import sys

import torch
import torch.distributed as dist


class Stopper:
    """Where a run stops early. SIGINT or SIGTERM: finish the step, save, exit; a second Ctrl-C: quit at once without
    saving. Under torchrun (group: a gloo process group) every rank stops after the same step, and a rank whose
    launcher is gone stops too: torchrun's workers run in their own sessions and would outlive it."""

    def __init__(self, group=None, rank=0):
        self.reason, self.group, self.rank, self.launcher = None, group, rank, os.getppid()
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)

    def request(self, signum, frame):
        name = signal.Signals(signum).name
        if self.reason == name == "SIGINT":  # not SIGTERM: torchrun sends one on Ctrl-C after the SIGINT
            print("quitting without saving", file=sys.stderr)
            raise SystemExit(130)
        if self.reason is None:
            self.reason = name
            print(f"\n{name}: stopping after this step (Ctrl-C again to quit without saving)", file=sys.stderr)

    def __call__(self):
        """Whether to stop after this step: asked here or, under DDP, on any rank."""
        if self.group is None:
            return self.reason is not None
        if self.reason is None and os.getppid() != self.launcher:
            self.reason = "launcher gone"
            print(
                f"rank {self.rank}: torchrun (pid {self.launcher}) is gone: stopping after this step", file=sys.stderr
            )
        flag = torch.tensor([int(self.reason is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def ignore_signals(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def before_exit():
    """Kill the loader's worker processes: they ignore SIGTERM (see ignore_signals), so the exit handler of
    multiprocessing, which terminates and then joins them, would wait forever after an error. And leave the objects
    of torch's modules to the OS: the interpreter's last collections over them take most of a second on a small CPU."""
    gc.freeze()
    if hasattr(signal, "SIGCHLD"):  # the loader's SIGCHLD handler would raise at the first death
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(5)
