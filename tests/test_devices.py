"""The paths that run off the CPU, checked on the CPU.

Device mistakes: train.py's and test.py's own set-up code runs on PyTorch's meta device (shapes, no data), where an
op that meets a CPU tensor fails, and every parameter, buffer, optimizer state, replay buffer and input is asked where
it lives. The CUDA graph's fallback: a capture that fails leaves training going eagerly, from the same state. And
amp_dtype picks float16 on a GPU that only emulates bfloat16.
"""

import contextlib
import importlib
import importlib.util
import itertools
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoints
import run_state
from conftest import FAST, ROOT, make_dataset, run_script
from datasets import EpochSampler, ImageDataset
from models import Generator
from runtime import amp_dtype, chosen_device, device_features
from utils import ReplayBuffer, UserError

train = importlib.import_module("train")
META = torch.device("meta")


def load_test_script():
    """test.py as a module (it cannot be imported by name: it shadows the stdlib `test` package)."""
    spec = importlib.util.spec_from_file_location("cyclegan_test_script", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def off_device(tensors, device=META):
    """The names of the tensors not on `device`."""
    return [name for name, t in tensors if t.device.type != device.type]


def net_tensors(net, prefix):
    return [(f"{prefix}.{k}", t) for k, t in itertools.chain(net.named_parameters(), net.named_buffers())]


def optimizer_tensors(optimizer, prefix):
    """Every tensor an optimizer holds: its moments and step counts per parameter, and its lr if that is a tensor."""
    found = [
        (f"{prefix}.state[{i}].{k}", v)
        for i, s in enumerate(optimizer.state.values())
        for k, v in s.items()
        if torch.is_tensor(v)
    ]
    return found + [(f"{prefix}.lr", g["lr"]) for g in optimizer.param_groups if torch.is_tensor(g["lr"])]


@pytest.fixture
def fused_adam_on_meta(monkeypatch):
    """Fused Adam on meta tensors. PyTorch's check that fused parameters sit on a supported device lets meta through,
    and its kernels (tensor lr, as on CUDA, and float lr, as on MPS) are given meta versions that check where every
    argument lives. Yields the list of argument names the kernel found off the meta device, per call."""
    adam_module = importlib.import_module("torch.optim.adam")
    check = adam_module._device_dtype_check_for_fused
    monkeypatch.setattr(
        adam_module, "_device_dtype_check_for_fused", lambda p, *a, **k: None if p.is_meta else check(p, *a, **k)
    )
    calls = []

    def kernel(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        *,
        lr,
        grad_scale=None,
        found_inf=None,
        **hyper,
    ):
        lists = {
            "params": params,
            "grads": grads,
            "exp_avgs": exp_avgs,
            "exp_avg_sqs": exp_avg_sqs,
            "state_steps": state_steps,
        }
        tensors = [(f"{k}[{i}]", t) for k, ts in lists.items() for i, t in enumerate(ts)]
        if torch.is_tensor(lr):
            tensors.append(("lr", lr))
        calls.append(off_device(tensors))

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_fused_adam_.tensor_lr", kernel, "Meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": PyTorch's own meta version
        lib.impl("_fused_adam_", kernel, "Meta")
    yield calls
    lib._destroy()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A dataset and the checkpoint of a finished one-epoch CPU run on it (with replay buffers and Adam moments)."""
    tmp = tmp_path_factory.mktemp("devices")
    data = make_dataset(tmp / "data", n_A=3, n_B=2)
    r = run_script("train.py", "--dataroot", data, "--output_dir", tmp / "run", *FAST, "--batchSize", "2")
    assert r.returncode == 0, r.stderr
    return data, tmp / "run"


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # meta weights hold no values to load
@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_train_set_up_restore_and_step_keep_every_tensor_on_the_device(
    finished_run, fused_adam_on_meta, monkeypatch, kind
):
    """The meta device stands in for `kind`: what that device type decides (device_features) is the real one's."""
    monkeypatch.setattr(run_state, "device_features", lambda device: device_features(torch.device(kind)))
    data, out = finished_run
    args = train.get_parser().parse_args(["--dataroot", str(data), "--output_dir", str(out), "--resume", *FAST])
    ckpt = checkpoints.load_checkpoint(
        args, set(), train.get_parser(), train.CHECKPOINT_TYPES
    )  # merges the run's flags
    run = train.build(args, META)
    assert train.restore(run, ckpt, args) == 1
    assert run.buffers[0].n > 0 and run.buffers[0].data.is_meta and run.buffers[1].data.is_meta

    def placement():
        tensors = [t for name, net in run.nets.items() for t in net_tensors(net, name)]
        tensors += optimizer_tensors(run.optimizer_G, "optimizer_G") + optimizer_tensors(run.optimizer_D, "optimizer_D")
        tensors += [(f"buffers[{i}].data", b.data) for i, b in enumerate(run.buffers)]
        return tensors

    tensors = placement()
    assert off_device(tensors) == []
    assert sum("state" in name for name, _ in tensors) == 3 * sum(len(list(n.parameters())) for n in run.nets.values())
    lr_G, lr_D = run.optimizer_G.param_groups[0]["lr"], run.optimizer_D.param_groups[0]["lr"]
    if kind == "cuda":  # a captured graph reads the lr from device memory
        assert lr_G.is_meta and lr_D.is_meta and lr_G is not lr_D  # the schedules never write into each other's lr
    else:  # MPS runs the step eagerly: plain float lrs, non-capturable Adam
        assert type(lr_G) is type(lr_D) is float and not run.optimizer_G.param_groups[0]["capturable"]
    assert run.memory_format == torch.channels_last

    dataset = ImageDataset(data, args.size, seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=EpochSampler(len(dataset), args.seed))
    step = train.make_step(run, args)
    for batch in itertools.islice(loader, 2):  # a full batch, then the smaller last one
        inputs = train.to_device(batch, run.buffers, META, run.memory_format)
        assert off_device(zip("real_A real_B choices_A choices_B".split(), inputs)) == []
        assert inputs[0].is_contiguous(memory_format=torch.channels_last)
        losses, images = step(*inputs)
        assert losses.is_meta and losses.shape == (7,) and all(x.is_meta for x in images)
    assert fused_adam_on_meta == [[]] * 4  # both optimizers, both steps: every tensor Adam was handed was on meta
    assert off_device(placement()) == []


def test_train_set_up_on_the_cpu_stays_as_it_was(finished_run):
    """The CPU keeps float lrs, the default layout and non-capturable Adam: results stay those of the plain step."""
    data, out = finished_run
    args = train.get_parser().parse_args(["--dataroot", str(data), *FAST])
    run = train.build(args, torch.device("cpu"))
    for optimizer in (run.optimizer_G, run.optimizer_D):
        assert optimizer.param_groups[0]["lr"] == 2e-4 and not optimizer.param_groups[0]["capturable"]
    assert run.memory_format == torch.contiguous_format


def test_test_script_puts_generators_and_images_on_the_device(tmp_path):
    test_script = load_test_script()
    data = make_dataset(tmp_path / "data", n_A=2, n_B=1)
    for name in ("netG_A2B", "netG_B2A"):
        torch.save(Generator(3, 3, 1).state_dict(), tmp_path / f"{name}.pth")
    args = test_script.get_parser().parse_args(["--dataroot", str(data), "--output_dir", str(tmp_path)])
    jobs = test_script.jobs_of(args, META)
    layout, autocast = test_script.precision(META)
    for _, _, nc, G, _, G_back in jobs:
        assert off_device(net_tensors(G, "G") + net_tensors(G_back, "G_back")) == []
        images = torch.rand(2, nc, 36, 40) * 2 - 1  # as the loader hands them over, on the CPU
        results = test_script.translate_batch(G, G_back, images, META, layout, autocast)
        assert [(r.device.type, r.dtype, tuple(r.shape)) for r in results] == [
            ("meta", torch.uint8, (2, 3, 36, 40))
        ] * 3


class FailingCapture(TorchDispatchMode):
    """Stands in for torch.cuda.graph: the step's first `ops` tensor operations run, then one fails as an op that
    may not be captured does. On a GPU nothing in a capture executes; here the forward's first ops do, which changes
    no state: the first write to a weight, a moment or a replay buffer comes much later."""

    def __init__(self, graph, ops=20, **kwargs):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops -= 1
        if self.ops < 0:
            raise RuntimeError("operation not permitted when stream is capturing\n(CUDA's longer explanation)")
        return func(*args, **(kwargs or {}))

    def __exit__(self, kind, value, tb):
        super().__exit__(kind, value, tb)
        if value is not None:  # as capture_end does after an error inside the capture
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")


@pytest.fixture
def fake_cuda_streams(monkeypatch):
    """Just enough of torch.cuda for CudaGraphStep to run on the CPU; the capture always fails. Returns a record of
    the graphs made and the streams set."""
    record = SimpleNamespace(graphs=0, set_streams=[])
    stream = SimpleNamespace(wait_stream=lambda other: None)

    def new_graph():
        record.graphs += 1
        return object()

    for name, value in {
        "Stream": lambda: stream,
        "current_stream": lambda: stream,
        "stream": lambda s: contextlib.nullcontext(),
        "CUDAGraph": new_graph,
        "graph": FailingCapture,
        "set_stream": record.set_streams.append,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    record.stream = stream
    return record


def test_a_failed_capture_leaves_one_line_and_the_run_goes_on_eagerly_from_the_same_state(
    finished_run, fake_cuda_streams, capsys
):
    data, _ = finished_run
    args = train.get_parser().parse_args(["--dataroot", str(data), *FAST, "--pool_size", "3"])
    g = torch.Generator().manual_seed(1)
    batches = [[torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in "AB"] for _ in range(5)]
    runs = []
    for graph in (False, True):  # all eager; then 1 warm-up, a failed capture, 3 more
        torch.manual_seed(0)
        run = train.build(args, torch.device("cpu"))
        step = train.make_step(run, args)
        step = train.CudaGraphStep(step, warmup=1) if graph else step
        losses = [step(a, b, *(buf.draw(2) for buf in run.buffers))[0] for a, b in batches]
        runs.append(
            (
                torch.stack(losses),
                [t for net in run.nets.values() for t in net.state_dict().values()],
                [t for o in (run.optimizer_G, run.optimizer_D) for _, t in optimizer_tensors(o, "")],
                [b.data for b in run.buffers],
            )
        )
    (eager_losses, *eager_state), (graph_losses, *graph_state) = runs
    assert torch.equal(graph_losses, eager_losses)
    for eager, graph in zip(eager_state, graph_state):
        assert len(eager) == len(graph) and all(torch.equal(a, b) for a, b in zip(eager, graph))
    assert fake_cuda_streams.graphs == 1  # tried once, not at every step
    assert fake_cuda_streams.set_streams == [fake_cuda_streams.stream]  # back on the stream it started from
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "CUDA graph capture failed (RuntimeError: operation not permitted when stream is capturing); "
        "the step runs eagerly from here on (as with --eager)"
    ]


def test_the_replay_buffer_keeps_and_returns_the_fakes_layout():
    buffer = ReplayBuffer(4, 0)
    fakes = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    for _ in range(6):  # fills, then swaps
        seen = buffer.push_and_pop(fakes, buffer.draw(2))
        assert seen.is_contiguous(memory_format=torch.channels_last)
    assert buffer.data.is_contiguous(memory_format=torch.channels_last)
    assert all(row.is_contiguous() for row in buffer.state_dict()["data"])  # checkpoints stay in the plain layout


@pytest.mark.parametrize(
    "avx512, avx512_bf16, amx, native",
    [
        (False, False, False, False),
        (True, False, False, False),
        (True, True, False, True),
        (True, True, True, True),
        (True, False, True, True),
    ],
)
def test_amp_dtype_takes_bfloat16_on_a_cpu_only_where_it_is_native(monkeypatch, avx512, avx512_bf16, amx, native):
    """oneDNN emulates bfloat16 on any AVX-512 CPU (there --amp ran at a third of fp32's speed): a CPU needs the
    AVX512-BF16 instructions or AMX tiles for --amp to take bfloat16; otherwise it trains in float32."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: avx512)  # what it used to ask
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert amp_dtype(torch.device("cpu")) == (torch.bfloat16 if native else None)


@pytest.mark.parametrize("major, native", [(7, False), (8, True), (9, True)])
def test_amp_dtype_takes_float16_where_bfloat16_is_only_emulated(monkeypatch, major, native):
    """A pre-Ampere GPU (compute capability 7.x) can make bfloat16 tensors, which is all that is_bf16_supported()
    asks by default, but computes them slowly: --amp must take float16 with loss scaling there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    assert amp_dtype(torch.device("cuda")) == (torch.bfloat16 if native else torch.float16)


def device_args(device=None, cuda=False):
    return SimpleNamespace(device=device, cuda=cuda)


@pytest.mark.parametrize(
    "device, cuda, gpus, message",
    [
        (None, True, 0, "--cuda was given but PyTorch sees no CUDA GPU; drop --cuda to run on the CPU"),
        ("cuda", False, 0, "--device cuda was given but PyTorch sees no CUDA GPU; drop --device to run on the CPU"),
        ("cuda:2", False, 2, "--device cuda:2: PyTorch sees 2 CUDA GPU(s) here, cuda:0 to cuda:1"),
        ("cpu", True, 1, "--cuda and --device cpu disagree: give one of them"),
        ("gpu", False, 1, "--device gpu: not a device name; use cpu, cuda, cuda:N or mps"),
        ("xpu", False, 1, "--device xpu: this program runs on cpu, cuda, cuda:N or mps"),
        ("mps", False, 0, "--device mps: PyTorch sees no Apple GPU (MPS) here; use --device cpu"),
    ],
)
def test_a_device_this_machine_does_not_have_is_one_line(monkeypatch, device, cuda, gpus, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError) as e:
        chosen_device(device_args(device, cuda))
    assert str(e.value) == message


def test_devices_that_exist_are_chosen_and_cuda_is_the_seeds_alias(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert chosen_device(device_args()) == torch.device("cpu")
    assert chosen_device(device_args(cuda=True)) == torch.device("cuda")
    assert chosen_device(device_args("cuda", cuda=True)) == torch.device("cuda")
    assert chosen_device(device_args("mps")) == torch.device("mps")
    assert current == []  # "cuda" keeps PyTorch's current GPU, as --cuda always did
    assert chosen_device(device_args("cuda:1")) == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]  # streams, graphs and free memory follow the current GPU
    features = {kind: device_features(torch.device(kind)) for kind in ("cpu", "cuda", "mps")}
    assert [f.graphs for f in features.values()] == [False, True, False]
    assert [f.pin_memory for f in features.values()] == [False, True, False]
    assert [f.memory_format for f in features.values()] == [torch.contiguous_format] + [torch.channels_last] * 2


def test_the_printed_resume_command_keeps_the_device():
    args = SimpleNamespace(output_dir="runs/x", fid_weights=None, device="cuda:1", cuda=False)
    assert checkpoints.resume_command(args) == "python train.py --resume --output_dir runs/x --device cuda:1"
    args.device, args.cuda = None, True
    assert checkpoints.resume_command(args) == "python train.py --resume --output_dir runs/x --cuda"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "test.py", "export.py"])
def test_each_script_refuses_an_unknown_device_in_one_line(tmp_path, script):
    out = tmp_path / "out"
    flags = {
        "train.py": ["--dataroot", tmp_path, "--output_dir", out],
        "test.py": ["--dataroot", tmp_path, "--output_dir", out],
        "export.py": ["--generator", tmp_path / "G.pth", "--output", out / "G.onnx"],
    }[script]
    r = run_script(script, "--device", "cuda:7", *flags)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "--device cuda:7" in r.stderr.strip().splitlines()[-1]
    assert not out.exists()  # refused before anything was written
