"""Export a generator to ONNX, for use without PyTorch, and check the file with onnxruntime before keeping it.

    python export.py --generator output/netG_A2B.pth --output G_A2B.onnx
    python export.py --generator pretrained/horse2zebra.pth --output horse2zebra.onnx

Any file test.py loads: this repository's generators (--attention ones too), the seed's, the CycleGAN authors'
released ones, other ResNet layouts. The graph takes a batch of images of any height and width from 8 px up, pads
them to a multiple of 4 and crops back inside, so its output is test.py's translation; the model's metadata says
how to make its input and read its output (docs/translating.md: Using a generator elsewhere).
"""

import argparse
import gc
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from files import shown, write_atomic
from models import AttentionGenerator, load_generator
from runtime import chosen_device
from translation import translate
from utils import UserError, channels_problem, first_line

# (batch, height, width) checked against PyTorch after the export: no side a multiple of 4, one batch of 2.
CHECK_SHAPES = [(1, 37, 50), (2, 29, 31), (1, 8, 65)]
TOLERANCE = 1e-4  # largest difference allowed, on outputs in [-1, 1]; 1 grey level is 0.0078


class Padded(torch.nn.Module):
    """G as test.py runs it, as one graph: H and W reflect-padded at the bottom and right up to a multiple of 4 (the
    generator's two stride-2 layers), translated, cropped back. (B, C, H, W) in [-1, 1], H and W at least 8."""

    def __init__(self, G):
        super().__init__()
        self.G = G

    def forward(self, image):
        h, w = image.shape[-2], image.shape[-1]
        y = self.G(F.pad(image, (0, (4 - w % 4) % 4, 0, (4 - h % 4) % 4), mode="reflect"))
        return y[..., :h, :w]


def metadata(G, args):
    """What a user of the file needs to know, as ONNX metadata_props (strings)."""
    colours = {1: "grey", 3: "RGB"}
    return {
        "input": f"image: float32 (batch, {args.input_nc}, height, width), {colours[args.input_nc]}, height and width "
        f"at least 8, values in [-1, 1]: pixel / 127.5 - 1",
        "output": f"translated: float32 (batch, {args.output_nc}, height, width), the input's size, "
        f"{colours[args.output_nc]}, values in [-1, 1]: pixel = floor(clip((value + 1) * 127.5 + 0.5, 0, 255))",
        "generator": Path(args.generator).name,
        "architecture": ("attention-guided " if isinstance(G, AttentionGenerator) else "")
        + f"CycleGAN ResNet generator, {sum(isinstance(m, torch.nn.Conv2d) for m in G.modules())} convolutions",
    }


def export(G, input_nc, device):
    """The ONNX model (an onnx.ModelProto) of Padded(G), traced on `device`, with dynamic batch, height and width."""
    example = torch.rand(1, input_nc, 36, 44, device=device) * 2 - 1
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=8), 3: torch.export.Dim("width", min=8)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(
            Padded(G).eval(),
            (example,),
            dynamo=True,
            dynamic_shapes={"image": dims},
            input_names=["image"],
            output_names=["translated"],
            verbose=False,
        )
    return program.model_proto


def largest_difference(G, model_bytes, input_nc, device, out):
    """The largest difference between onnxruntime's outputs and PyTorch's (test.py's translate) over CHECK_SHAPES;
    onnxruntime failing to load or run the file is a UserError (out: the file then not written)."""
    import onnxruntime

    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand(b, input_nc, h, w, generator=generator) * 2 - 1 for b, h, w in CHECK_SHAPES]
    try:  # its errors (Fail, InvalidGraph, RuntimeException, ...) share no base class short of Exception
        session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        outputs = [torch.from_numpy(session.run(None, {"image": x.numpy()})[0]) for x in inputs]
    except Exception as e:
        raise UserError(
            f"onnxruntime could not run the exported file ({type(e).__name__}: {first_line(e)[:300]}): "
            f"{shown(out)} was not written"
        ) from None
    worst = 0.0
    for x, got in zip(inputs, outputs):
        want = translate(G, x.to(device)).cpu()
        if got.shape != want.shape:
            return float("inf")
        worst = max(worst, (got - want).abs().max().item())
    return worst


def main(args):
    try:
        import onnx
        import onnxruntime  # noqa: F401 (the check needs it: missing, nothing is exported)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"the export needs the {e.name} package: pip install -r requirements.txt") from None
    if channels_problem(args):
        raise UserError(channels_problem(args))
    device = chosen_device(args)
    torch.backends.cudnn.allow_tf32 = False  # the check compares float32 with float32, not TF32's 10-bit mantissas
    try:
        G = load_generator(args.generator, args.input_nc, args.output_nc).eval().to(device)
    except ValueError as e:
        raise UserError(e) from None
    out = Path(args.output)
    if not out.parent.is_dir():
        raise UserError(f"--output {shown(out)}: the folder {shown(out.parent)} does not exist")
    try:
        model = export(G, args.input_nc, device)
    except Exception as e:  # the exporter's errors are long; its first line names the cause
        raise UserError(
            f"{shown(args.generator)} could not be exported to ONNX ({type(e).__name__}: {first_line(e)[:300]})"
        ) from None
    onnx.helper.set_model_props(model, metadata(G, args))
    model_bytes = model.SerializeToString()
    worst = largest_difference(G, model_bytes, args.input_nc, device, out)
    sizes = ", ".join(f"{b}x{h}x{w}" for b, h, w in CHECK_SHAPES)
    if not worst <= TOLERANCE:
        raise UserError(
            f"onnxruntime's output differs from PyTorch's by {worst:.2g} (more than {TOLERANCE:g}) on "
            f"batch x height x width {sizes}: {shown(out)} was not written"
        )
    try:
        write_atomic(out, lambda f: f.write(model_bytes))
    except OSError as e:
        raise UserError(
            f"cannot write {shown(out)} ({e.strerror or first_line(e)}): pick a path you can write to"
        ) from None
    print(
        f"wrote {shown(out)} ({len(model_bytes) / 2**20:.1f} MiB); onnxruntime vs PyTorch on {sizes}: largest "
        f"difference {worst:.1e}"
    )
    return 0


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="a generator file test.py loads (e.g. output/netG_A2B.pth)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--input_nc", type=int, default=3, help="channels of the images it translates (1: grey, 3: RGB)")
    p.add_argument("--output_nc", type=int, default=3, help="channels of its translations")
    p.add_argument("--device", type=str, help="where PyTorch traces and checks it: cpu, cuda, cuda:N or mps")
    p.add_argument("--cuda", action="store_true", help="the seed's flag: --device cuda")
    return p


if __name__ == "__main__":
    try:
        code = main(get_parser().parse_args())
    except UserError as e:
        code = f"error: {e}"
    gc.freeze()  # no last collection over torch's objects at exit: most of a second on a small CPU
    sys.exit(code)
