"""export.py and the Python API: each kind of generator file test.py loads, exported with dynamic batch, height and
width and run by onnxruntime on images whose sides are not multiples of 4, gives test.py's PNGs; the examples of
docs/translating.md run as written; what a user gets wrong is one line, and a file that fails its check is not left
behind."""

import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

import export
import models
import translation
from conftest import ROOT, run_script
from datasets import make_demo


def authors_layout(G):
    """The authors' released files: other module names, InstanceNorm running stats from an old PyTorch."""
    state = {}
    for i, (key, value) in enumerate(G.state_dict().items()):
        state[f"net.{i}.{key.rsplit('.', 1)[1]}"] = value
        if key.endswith("bias") and value.dim() == 1:
            state[f"net.{i}.running_mean"] = torch.zeros_like(value)
    return state


KINDS = {  # what test.py loads besides our own files (the seed's have our keys: the docs' example covers them); other
    # layouts load as the authors' do, by order (tests/test_models.py), and export the same loaded module
    "authors": lambda: authors_layout(models.Generator(3, 3, 1)),
    "attention": lambda: models.AttentionGenerator(3, 1).state_dict(),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Demo scenes of 37 x 37 px, and one of 30 x 45 (RGBA), none a multiple of 4 a side."""
    root = make_demo(tmp_path_factory.mktemp("demo"), size=37, n_train=1, n_test=2)
    folder = root / "test" / "A"
    Image.open(folder / "0000.png").resize((30, 45)).convert("RGBA").save(folder / "odd.png")
    return folder


def run_onnx(path, image):
    """The docs' onnxruntime example, as a function: a PIL image through the exported file to a uint8 array."""
    session = onnxruntime.InferenceSession(str(path))
    x = (np.asarray(image.convert("RGB"), dtype=np.float32) / 255 * 2 - 1).transpose(2, 0, 1)[None]
    y = session.run(None, {"image": x})[0][0]
    return (0.5 * (y + 1) * 255 + 0.5).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)


def assert_close_pixels(a, b):
    """At most one grey level apart, on under 1% of the values."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert a.shape == b.shape and diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_generator_file_exports_to_test_pys_pixels(kind, images, tmp_path, capsys):
    torch.manual_seed(1)
    torch.save(KINDS[kind](), tmp_path / "G.pth")
    assert (
        export.main(
            export.get_parser().parse_args(
                ["--generator", str(tmp_path / "G.pth"), "--output", str(tmp_path / "G.onnx")]
            )
        )
        == 0
    )
    assert "largest difference" in capsys.readouterr().out and not list(tmp_path.glob("*.tmp"))
    props = {p.key: p.value for p in onnx.load(tmp_path / "G.onnx").metadata_props}
    assert "[-1, 1]" in props["input"] and "height and width" in props["input"] and props["generator"] == "G.pth"
    G = models.load_generator(tmp_path / "G.pth")
    for path in sorted(images.iterdir()):
        image = Image.open(path).convert("RGB")  # the RGBA one: the docs' example has no alpha handling
        assert_close_pixels(run_onnx(tmp_path / "G.onnx", image), np.asarray(translation.translate_image(G, image)))


def test_translate_image_writes_the_pixels_test_py_writes(images, tmp_path):
    G = models.Generator(3, 3, 1)
    torch.save(G.state_dict(), tmp_path / "G.pth")
    r = run_script(
        "test.py",
        "--input",
        images,
        "--generator",
        tmp_path / "G.pth",
        "--output_dir",
        tmp_path / "out",
        "--n_cpu",
        "0",
    )
    assert r.returncode == 0, r.stderr
    G = models.load_generator(tmp_path / "G.pth")
    for path in sorted(images.iterdir()):  # the RGBA scene too: alpha over white, as test.py decodes it
        written = np.asarray(Image.open(tmp_path / "out" / "B" / f"{path.stem}.png"))
        assert np.array_equal(np.asarray(translation.translate_image(G, Image.open(path))), written), path.name


def docs_section(title, page="docs/translating.md"):
    """The code blocks of the docs page's section `title`, in order: (language, code)."""
    text = (ROOT / page).read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


@pytest.mark.slow
def test_the_docs_examples_run_as_written(images, tmp_path):
    """The export command, the Python API and the onnxruntime example, in a folder laid out as after the demo."""
    (tmp_path / "output" / "demo").mkdir(parents=True)
    (tmp_path / "datasets" / "demo" / "test").mkdir(parents=True)
    (tmp_path / "datasets" / "demo" / "test" / "A").symlink_to(images)
    torch.save(models.Generator(3, 3, 1).state_dict(), tmp_path / "output" / "demo" / "netG_A2B.pth")
    blocks = docs_section("Using a generator elsewhere")
    assert [language for language, _ in blocks] == ["python", "bash", "python"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    for language, code in blocks:
        if language == "bash":  # python export.py ...: run with this interpreter
            code = code.replace("python export.py", f"{sys.executable} {ROOT / 'export.py'}")
            cmd = ["bash", "-c", code]
        else:
            cmd = [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert r.returncode == 0, (code, r.stderr)
    api, ort = (np.asarray(Image.open(tmp_path / name)) for name in ("winter.png", "winter_onnx.png"))
    assert_close_pixels(ort, api)


@pytest.mark.slow
def test_what_a_user_gets_wrong_is_one_line_and_a_failed_check_leaves_no_file(tmp_path, monkeypatch):
    (tmp_path / "notes.pth").write_text("not weights")
    torch.save(models.Generator(3, 3, 1).state_dict(), tmp_path / "G.pth")
    cases = [
        (["--generator", tmp_path / "notes.pth", "--output", tmp_path / "G.onnx"], "is not a PyTorch weights file"),
        (["--generator", tmp_path / "none.pth", "--output", tmp_path / "G.onnx"], "does not exist"),
        (["--generator", tmp_path / "G.pth", "--output", tmp_path / "no" / "G.onnx"], "does not exist"),
        (["--generator", tmp_path / "G.pth", "--output", tmp_path / "G.onnx", "--input_nc", "2"], "--input_nc 2"),
    ]
    for argv, words in cases:
        with pytest.raises(export.UserError, match=words):
            export.main(export.get_parser().parse_args(map(str, argv)))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnxruntime", None)  # not installed
        with pytest.raises(export.UserError, match="needs the onnxruntime package: pip install -r requirements.txt"):
            export.main(export.get_parser().parse_args(["--generator", str(tmp_path / "G.pth"), "--output", "x"]))
    monkeypatch.setattr(export, "TOLERANCE", 1e-12)  # onnxruntime's convolutions round otherwise than PyTorch's
    with pytest.raises(export.UserError, match=r"differs from PyTorch's by .* was not written"):
        export.main(
            export.get_parser().parse_args(
                ["--generator", str(tmp_path / "G.pth"), "--output", str(tmp_path / "G.onnx")]
            )
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G.pth", "notes.pth"]


@pytest.mark.slow
def test_an_onnxruntime_failure_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    torch.save(models.Generator(3, 3, 1).state_dict(), tmp_path / "G.pth")

    def failing(*args, **kwargs):
        raise onnxruntime.capi.onnxruntime_pybind11_state.Fail("[ONNXRuntimeError] : 1 : FAIL : no kernel\nmore")

    monkeypatch.setattr(onnxruntime, "InferenceSession", failing)
    argv = ["--generator", str(tmp_path / "G.pth"), "--output", str(tmp_path / "G.onnx")]
    with pytest.raises(
        export.UserError,
        match=r"^onnxruntime could not run the exported file \(Fail: .*FAIL : no kernel\): .*G.onnx was not written$",
    ):
        export.main(export.get_parser().parse_args(argv))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G.pth"]
