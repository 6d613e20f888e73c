"""metrics.py and test.py --metrics, offline: a tiny feature extractor registered with torch-fidelity stands in for
Inception, the numbers are checked against the formulas computed here, and the network is blocked throughout."""

import importlib.util
import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.hub
import torch.nn.functional as F
from PIL import Image
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity import __version__ as tf_version
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

import metrics
from conftest import ROOT, make_dataset, run_script, write_image
from models import Generator
from test_test_script import page_links

TINY = "tiny-test"


class Tiny(FeatureExtractorBase):
    """16 features of a uint8 image: a fixed random 5x5 conv (stride 2), ReLU, and the mean over the image."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)  # not torch's global generator: evaluate must leave that alone
        self.register_buffer("weight", torch.randn(16, 3, 5, 5, generator=g) / 8)
        self.register_buffer("bias", torch.randn(16, generator=g) / 4)

    @staticmethod
    def get_provided_features_list():
        return ("16",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "16"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        Tiny.images += len(x)
        return (F.relu(F.conv2d(x.float() / 127.5 - 1, self.weight, self.bias, stride=2)).mean((2, 3)),)


Tiny.images = 0  # images seen, to tell cached features from extracted ones
if TINY not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(TINY, Tiny)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network (name lookups, internet sockets and torch.hub downloads fail), and a torch home of our own."""

    def refuse(*args, **kwargs):
        raise OSError("network blocked in tests")

    inet_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse()
        return inet_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(metrics, "EXTRACTOR", TINY)


def blobs(folder, n, seed, shift=0, size=24):
    """n smooth random colour images (3x3 noise, upsampled), brightened by `shift`; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 200, (3, 3, 3), dtype=np.uint8))
        pixels = np.asarray(small.resize((size, size), Image.BILINEAR), dtype=int) + shift
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(paths[-1])
    return paths


def features(paths):
    """The tiny extractor's features of image files, in float64, computed here rather than by the library."""
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])
    return Tiny(TINY, ["16"])(x)[0].double().numpy()


def frechet(f1, f2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), square roots from symmetric eigendecompositions."""
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_root = np.sum(np.sqrt(np.clip(middle, 0, None)))  # tr (S1 S2)^1/2
    return np.sum((f1.mean(0) - f2.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_root


def mmd_unbiased(f1, f2):
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, one subset of all images (both sets of n)."""
    n, d = f1.shape

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    k11, k22 = k(f1, f1), k(f2, f2)
    return ((k11.sum() - np.trace(k11)) + (k22.sum() - np.trace(k22))) / (n * (n - 1)) - 2 * k(f1, f2).mean()


def test_fid_of_a_folder_against_itself_is_zero(tmp_path, tiny):
    blobs(tmp_path / "x", 24, seed=0)
    r = metrics.evaluate(tmp_path / "x", tmp_path / "x")
    assert abs(r["fid"]) < 1e-6 and r["fake"] == r["real"] == {"count": 24, "sizes": {"24x24": 24}}


def test_fid_and_kid_equal_the_formulas(tmp_path, tiny):
    real = blobs(tmp_path / "real", 24, seed=1)
    fake = blobs(tmp_path / "fake", 24, seed=1, shift=40)  # the same images, brighter
    r = metrics.evaluate(tmp_path / "fake", tmp_path / "real")
    f_fake, f_real = features(fake), features(real)
    assert r["fid"] == pytest.approx(frechet(f_fake, f_real), rel=1e-4) and r["fid"] > 0.01
    assert r["kid_mean"] == pytest.approx(mmd_unbiased(f_fake, f_real), rel=1e-4) and r["kid_mean"] > 0
    assert r["kid_subset_size"] == 24 and math.isnan(r["kid_std"])  # every subset is all of both sets: no spread


def test_tensors_in_memory_and_cached_real_features(tmp_path, tiny):
    real = blobs(tmp_path / "real", 6, seed=2)
    fake_files = blobs(tmp_path / "fake", 5, seed=3, size=20)
    fake = [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in fake_files]  # as training would
    fake[0] = fake[0][:1]  # a gray one: repeated to RGB, as PIL's convert("RGB") does
    Image.fromarray(fake[0][0].numpy()).save(fake_files[0])
    state, before = torch.get_rng_state(), Tiny.images
    first = metrics.evaluate(fake, tmp_path / "real", cache_name="real-set", cache_root=tmp_path / "cache")
    assert Tiny.images - before == 5 + 6 and torch.equal(torch.get_rng_state(), state)
    assert any((tmp_path / "cache").glob(f"real-set-{TINY}-{TINY}-features-*.pt"))
    before = Tiny.images
    again = metrics.evaluate(fake, real, cache_name="real-set", cache_root=tmp_path / "cache")
    assert Tiny.images - before == 5 and again == first  # the real set's features came from the cache
    assert first == metrics.evaluate(tmp_path / "fake", real)  # the same numbers from the PNG files
    assert first["kid_subset_size"] == 5 and first["fake"]["sizes"] == {"20x20": 5}
    with pytest.raises(ValueError, match="at least 2 images in each set; the fake set has 1"):
        metrics.evaluate(fake[:1], real)
    with pytest.raises(ValueError, match="uint8"):
        metrics.evaluate([x.float() for x in fake], real)


def test_missing_inception_weights_are_one_line(tmp_path):
    blobs(tmp_path / "x", 2, seed=0)
    with pytest.raises(ValueError) as e:  # the real default extractor, nothing in TORCH_HOME: it tries to download
        metrics.evaluate(tmp_path / "x", tmp_path / "x")
    line = str(e.value)
    assert "\n" not in line and "network blocked in tests" in line and "--fid_weights" in line
    assert metrics.URL_INCEPTION_V3 in line and str(tmp_path / "torch_home" / "hub" / "checkpoints") in line
    assert not metrics.hub_file().exists()
    (tmp_path / "w.pth").write_text("not weights")
    with pytest.raises(ValueError, match="is not a PyTorch weights file"):
        metrics.evaluate(tmp_path / "x", tmp_path / "x", weights=tmp_path / "w.pth")
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="is not a state_dict of inception-v3-compat"):
        metrics.evaluate(tmp_path / "x", tmp_path / "x", weights=tmp_path / "w.pth")


def run_test_py(*args):
    """test.py's main, run in this process (so that it sees the tiny extractor) under a name other than `test`."""
    spec = importlib.util.spec_from_file_location("cyclegan_test_script", ROOT / "test.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main(script.get_parser().parse_args([str(a) for a in args]))


def small_generators(folder):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in ("netG_A2B", "netG_B2A"):
        torch.save(Generator(3, 3, n_residual_blocks=1).state_dict(), folder / f"{name}.pth")
    return folder


def test_data_root_metrics_json_and_page(tmp_path, tiny, capsys):
    data = make_dataset(tmp_path / "d", n_A=3, n_B=4, size=(32, 28), modes=("RGB", "L"))
    nets, out = small_generators(tmp_path / "nets"), tmp_path / "out"
    assert (
        run_test_py(
            "--dataroot",
            data,
            "--generator_A2B",
            nets / "netG_A2B.pth",
            "--generator_B2A",
            nets / "netG_B2A.pth",
            "--output_dir",
            out,
            "--n_cpu",
            "0",
            "--metrics",
        )
        == 0
    )
    scores = json.loads((out / "metrics.json").read_text())
    for direction, fake, real, n in (("A2B", "B", "real_B", (3, 4)), ("B2A", "A", "real_A", (4, 3))):
        expected = metrics.evaluate(out / fake, out / real)  # the PNGs as written, real ones as the generators saw them
        assert {k: scores[direction][k] for k in expected} == expected
        assert (scores[direction]["fake"]["count"], scores[direction]["real"]["count"]) == n
        assert scores[direction]["real"]["sizes"] == {"32x28": n[1]} and scores[direction]["kid_subset_size"] == 3
    printed = capsys.readouterr().out
    assert all(f"{scores[d]['fid']:.2f}" in printed for d in ("A2B", "B2A"))
    p = scores["protocol"]
    assert (p["library"], p["feature_extractor"]) == ("torch-fidelity", TINY) and p["version"] == tf_version
    assert p["kid"]["seed"] == metrics.KID_SEED and p["kid"]["subsets"] == 100 and p["weights"] is None
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.index("FID and KID") < page.index("A → B")  # at the top
    for direction in ("A2B", "B2A"):
        assert f"<td>{scores[direction]['fid']:.2f}</td>" in page
    assert "metrics.json" in page_links(out / "index.html")


def test_input_mode_against_a_reference_folder(tmp_path, tiny, capsys):
    photos = tmp_path / "photos"
    for i, size in enumerate([(32, 28), (32, 28), (24, 36)]):
        write_image(photos / f"p{i}.png", "RGB", size, seed=i)
    reference = tmp_path / "zebras"
    blobs(reference, 4, seed=5)
    nets, out = small_generators(tmp_path / "nets"), tmp_path / "out"
    common = ("--input", photos, "--generator", nets / "netG_A2B.pth", "--output_dir", out, "--n_cpu", "0")
    assert run_test_py(*common, "--metrics", "--reference", reference) == 0
    scores = json.loads((out / "metrics.json").read_text())
    assert set(scores) == {"protocol", "A2B"} and scores["A2B"]["against"] == str(reference)
    assert scores["A2B"]["fake"]["sizes"] == {"24x36": 1, "32x28": 2}  # mixed sizes: batches of one
    assert scores["A2B"]["fid"] == metrics.evaluate(out / "B", reference)["fid"]
    assert f"{scores['A2B']['fid']:.2f}" in capsys.readouterr().out
    for flags, message in [
        ((), "needs --reference FOLDER"),
        (("--reference", tmp_path / "no"), "is not a folder"),
        (("--reference", reference, "--fid_weights", tmp_path / "no.pth"), "no.pth does not exist"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_test_py(*common, "--metrics", *flags)
    with pytest.raises(ValueError, match="go with --metrics"):
        run_test_py(*common, "--reference", reference)


@pytest.mark.slow
def test_the_script_says_in_one_line_where_the_weights_go(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=2, n_B=2, size=(32, 28))
    nets, out = small_generators(tmp_path / "nets"), tmp_path / "out"
    blocked = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    r = run_script(
        "test.py",
        "--dataroot",
        data,
        "--generator_A2B",
        nets / "netG_A2B.pth",
        "--generator_B2A",
        nets / "netG_B2A.pth",
        "--output_dir",
        out,
        "--n_cpu",
        "0",
        "--metrics",
        env={**blocked, "no_proxy": "", "NO_PROXY": "", "TORCH_HOME": str(tmp_path / "torch_home")},
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and metrics.URL_INCEPTION_V3 in errors[0] and "--fid_weights" in errors[0]
    assert len(list((out / "B").iterdir())) == 2 and (out / "index.html").is_file()  # translations written first
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_inception_from_a_local_weights_file(tmp_path, monkeypatch):
    """The real extractor's path end to end, with random weights of the right shapes saved as a local file."""
    from torch_fidelity import FeatureExtractorInceptionV3

    with monkeypatch.context() as m:  # build it without weights, to save its state_dict
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        m.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: None)
        torch.manual_seed(0)
        torch.save(FeatureExtractorInceptionV3(metrics.INCEPTION, ["2048"]).state_dict(), tmp_path / "w.pth")
    blobs(tmp_path / "real", 2, seed=0, size=64)  # Inception at 299 px: ~1.7 s per image on 2 CPU cores
    blobs(tmp_path / "fake", 2, seed=1, size=64)
    r = metrics.evaluate(tmp_path / "fake", tmp_path / "real", weights=tmp_path / "w.pth")
    assert np.isfinite(r["fid"]) and r["fid"] > 0 and np.isfinite(r["kid_mean"])
    p = metrics.protocol(weights=tmp_path / "w.pth")
    assert p["feature_extractor"] == metrics.INCEPTION and p["feature_layer"] == {"fid": "2048", "kid": "2048"}
    assert p["weights"]["file"] == "w.pth" and len(p["weights"]["sha256"]) == 64
    assert r["weights"] == p["weights"]["sha256"][:16]  # the row names the weights its numbers came from
    assert p["weights"]["same_as_library"] is False  # not the file torch-fidelity names: numbers are not papers'
    assert not metrics.hub_file().exists()  # nothing was downloaded


def test_the_tracker_refuses_up_front_what_would_fail_at_the_first_evaluation(tmp_path, tiny):
    """A --fid_weights file that is not weights, and test images too large to translate whole in the memory that
    is free: said when training starts, not K epochs in."""
    data = make_dataset(tmp_path / "d", n_A=2, n_B=2, size=(40, 36))
    (tmp_path / "out").mkdir()
    (tmp_path / "w.pth").write_text("not weights")
    with pytest.raises(ValueError, match="is not a PyTorch weights file"):
        metrics.Tracker(tmp_path / "out", data, 3, 3, weights=tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"40x36 px\) needs about .* GB to translate whole.*--max_size"):
        metrics.Tracker(tmp_path / "out", data, 3, 3, max_pixels=40 * 36 - 1)
    assert not (tmp_path / "out" / "metrics.csv").exists()  # nothing written before the checks
    assert metrics.Tracker(tmp_path / "out", data, 3, 3, max_pixels=40 * 36).rows == []


def test_reference_folders_are_decoded_as_our_loader_decodes(tmp_path, tiny):
    """A reference image with alpha and one stored on its side with an EXIF turn: the same pixels (and sizes) as
    training and test.py see, not what a plain convert("RGB") gives."""
    (tmp_path / "ref").mkdir()
    rgba = Image.new("RGBA", (24, 20), (255, 0, 0, 0))  # fully transparent red: white over white
    rgba.save(tmp_path / "ref" / "a.png")
    turned = Image.new("RGB", (24, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show
    turned.save(tmp_path / "ref" / "b.jpg", exif=exif)
    data = metrics.as_dataset(tmp_path / "ref", "real")
    assert torch.equal(data[0], torch.full((3, 20, 24), 255, dtype=torch.uint8)) and data[1].shape == (3, 24, 20)
    assert metrics.sizes_of(data, "real") == {"20x24": 1, "24x20": 1}
