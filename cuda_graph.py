"""The training step captured once as a CUDA graph and replayed: no Python or kernel-launch overhead per step."""

import sys

import torch


class CudaGraphStep:
    """`step` replayed as one CUDA graph on static input buffers: no Python or kernel-launch overhead per step.

    The first `warmup` calls run eagerly on a side stream (cuDNN picks its kernels; optimizers and replay buffers
    allocate their state), the next one captures the graph and replays it. Every call is a real training step. If the
    capture fails, one line names the error and every step runs eagerly: capturing executes nothing, so the state
    the eager step continues from is the state the capture started from."""

    def __init__(self, step, warmup=3):
        self.step, self.warmup, self.graph, self.eager = step, warmup, None, False

    def __call__(self, *inputs):
        if self.eager:
            return self.step(*inputs)
        if self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.graph = self.capture(inputs)
            if self.graph is None:
                self.eager = True
                return self.step(*inputs)
        for static, x in zip(self.inputs, inputs):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def capture(self, inputs):
        """The captured graph, reading self.inputs and writing self.outputs; None (and one line why) if it failed."""
        stream = torch.cuda.current_stream()
        self.inputs = [x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loader's pin-memory thread may allocate while we capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.step(*self.inputs)
            return graph
        except Exception as e:
            torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture's side stream current
            cause = e
            while cause.__context__ is not None:  # the error inside the step, not the capture's own complaint about it
                cause = cause.__context__
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            print(
                f"CUDA graph capture failed ({type(cause).__name__}: {first}); the step runs eagerly from here on "
                f"(as with --eager)",
                file=sys.stderr,
            )
            self.inputs = self.outputs = None
            return None
