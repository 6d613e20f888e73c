"""--attention (generators that say where they translate): the blend with the input, the file test.py recognises,
the maps in the sheets, on disk and on both pages; an attention run resumes bit for bit after SIGKILL (with --amp,
FID during training, figures) and runs under torchrun."""

import contextlib
import csv
import signal
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import datasets
import losses
import models
import report
import run_state
import train as train_py
import translation
from conftest import FAST, make_dataset, run_script
from test_ddp import torchrun
from test_epoch_end import Links, assert_same_weights, train
from utils import ReplayBuffer

NETS = ("G_A2B", "G_B2A", "D_A", "D_B")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_A=3, n_B=2, size=(28, 30))


def test_the_map_blends_the_content_with_the_input():
    G = models.AttentionGenerator(3, 1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        G.attention[-1].bias.fill_(-100.0)  # a = 0: the input passes unchanged
        out, a = G(x, attention=True)
        assert a.shape == (2, 1, 16, 16) and torch.allclose(out, x, atol=1e-6)
        G.attention[-1].bias.fill_(100.0)  # a = 1: the content alone, the paper's generator
        assert torch.allclose(G(x), G.model(x), atol=1e-6)
    assert set(G.state_dict()) - set(models.Generator(3, 3, 1).state_dict()) == {
        f"attention.{i}.{p}" for i in (1, 4, 7, 9) for p in ("weight", "bias")
    }
    x2, fresh = x.clone(), models.AttentionGenerator(3, 1)
    x2[:, :, 8, 8] += 1  # one pixel changed: the map may change 3 px around it (7 px receptive field), not further
    reach = (fresh.map(x2) - fresh.map(x)).abs()[0, 0] > 0
    rows, cols = reach.nonzero().T
    assert reach[8, 8] and rows.min() == cols.min() == 5 and rows.max() == cols.max() == 11
    assert losses.total_variation(torch.ones(1, 1, 5, 5)) == 0
    assert losses.total_variation(torch.eye(4)[None, None]) > 0


def attention_loss(lambda_identity=0.5, lambda_tv=0.1, lambda_sparsity=0.3, D=None):
    """(the logged terms, G_A2B) of one AttentionLoss forward on random images."""
    torch.manual_seed(0)
    G_A2B, G_B2A = models.AttentionGenerator(3, 1), models.AttentionGenerator(3, 1)
    loss = losses.AttentionLoss(G_A2B, G_B2A, 10.0, lambda_identity, lambda_tv, lambda_sparsity)
    real_A, real_B = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    D_A, D_B = (models.Discriminator(3), models.Discriminator(3)) if D is None else (D, D)
    (loss_G, terms), (fakes_A, fakes_B, _, _) = loss(real_A, real_B, D_A, D_B)
    attention_loss.seen = real_A, fakes_B
    return {"loss_G": loss_G, **terms}, G_A2B


def reaches(term, params):
    grads = torch.autograd.grad(term, list(params), retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_content_learns_the_papers_loss_and_the_map_only_its_own():
    """The contents get the paper's three terms and nothing of the maps' loss (they are detached there); the maps get
    loss_map only. So the content trains as the paper's generator does."""
    terms, G_A2B = attention_loss()
    content, attention = G_A2B.model.parameters(), G_A2B.attention.parameters()
    content, attention = list(content), list(attention)
    for name in ("loss_G_GAN", "loss_G_cycle", "loss_G_identity"):
        assert reaches(terms[name], content) and not reaches(terms[name], attention), name
    assert reaches(terms["loss_map"], attention) and not reaches(terms["loss_map"], content)
    assert torch.allclose(
        terms["loss_G"], terms["loss_G_GAN"] + terms["loss_G_cycle"] + terms["loss_G_identity"] + terms["loss_map"]
    )
    assert 0 < terms["map_A"] < 1 and 0 < terms["map_B"] < 1  # sigmoid(about 0): the maps start near 0.5


def test_the_discriminators_learn_from_the_blend_and_the_content():
    """Two fakes per image: the blend (what G writes) and the content (what the paper's D sees); learning only from
    the contents, D never saw the source domain, and the maps kept the green summer ground."""
    _, G_A2B = attention_loss()
    real_A, fakes_B = attention_loss.seen
    with torch.no_grad():
        blend, content = G_A2B(real_A), G_A2B.model(real_A)
    assert torch.allclose(fakes_B[:1], blend, atol=1e-5) and torch.allclose(fakes_B[1:], content, atol=1e-5)
    assert ReplayBuffer(50, 0, per_image=2).draw(3).shape == (6, 2)
    args = train_py.get_parser().parse_args(["--attention", "--seed", "0"])
    assert [b.per_image for b in run_state.build(args, torch.device("cpu"), 0, epoch_size=1).buffers] == [2, 2]


def blind(x):  # a discriminator whose verdict does not depend on its input: the GAN terms give no gradient
    return x.sum() * 0


def test_the_identity_of_the_blend_and_the_sparsity_teach_the_map_to_keep_and_a_negative_one_to_translate():
    last = lambda G: [G.attention[-1].bias]  # noqa: E731  (a > 0.5 everywhere as it grows)
    terms, G_A2B = attention_loss(lambda_identity=0.5, lambda_tv=0, lambda_sparsity=0, D=blind)
    grad = torch.autograd.grad(terms["loss_map"], last(G_A2B))[0]
    assert grad > 0  # keep: a falls where the content would change a real B image
    terms, G_A2B = attention_loss(lambda_identity=0, lambda_tv=0, lambda_sparsity=0, D=blind)
    assert not reaches(terms["loss_map"], G_A2B.attention.parameters())  # it was the identity term
    terms, G_A2B = attention_loss(lambda_identity=0, lambda_tv=0, lambda_sparsity=0.3, D=blind)
    assert torch.autograd.grad(terms["loss_map"], last(G_A2B))[0] > 0  # the sparsity pulls a down: keep
    terms, G_A2B = attention_loss(lambda_identity=0, lambda_tv=0, lambda_sparsity=-0.3, D=blind)
    assert torch.autograd.grad(terms["loss_map"], last(G_A2B))[0] < 0  # below 0, a floor: it pushes a up
    train_py.check_args(train_py.get_parser().parse_args(["--attention", "--lambda_sparsity", "-0.3"]))  # accepted


def test_test_py_loads_an_attention_generator_from_its_file(tmp_path):
    G = models.AttentionGenerator(3, 2)
    torch.save(G.state_dict(), tmp_path / "ours.pth")
    torch.save({f"module.{k}": v for k, v in G.state_dict().items()}, tmp_path / "ddp.pth")
    x = torch.rand(1, 3, 21, 18) * 2 - 1
    want, want_map = translation.translate(G.eval(), x, attention=True)
    for name in ("ours.pth", "ddp.pth"):
        loaded = models.load_generator(tmp_path / name).eval()
        got, got_map = translation.translate(loaded, x, attention=True)
        assert type(loaded) is models.AttentionGenerator and torch.equal(got, want) and torch.equal(got_map, want_map)
    torch.save(models.Generator(3, 3, 2).state_dict(), tmp_path / "plain.pth")
    plain = models.load_generator(tmp_path / "plain.pth")
    assert type(plain) is models.Generator and translation.translate(plain, x, attention=True)[1] is None
    with pytest.raises(ValueError, match="not a 1->1 channel generator"):
        models.load_generator(tmp_path / "ours.pth", 1, 1)
    release = models.AttentionGenerator(3, 2, depth=2)  # the design's first version: a 5 px map network
    torch.save(release.state_dict(), tmp_path / "release.pth")
    loaded = models.load_generator(tmp_path / "release.pth").eval()
    got, got_map = translation.translate(loaded, x, attention=True)
    want, want_map = translation.translate(release.eval(), x, attention=True)
    assert len(loaded.attention) == len(release.attention) and torch.equal(got, want) and torch.equal(got_map, want_map)
    broken = {k: v for k, v in G.state_dict().items() if k != "attention.9.bias"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="attention.. tensors do not fit a map network of 3x3"):
        models.load_generator(tmp_path / "broken.pth")


def test_a_generator_of_the_first_attention_design_is_refused_in_one_line(tmp_path):
    """The first design: the map was a fourth output channel of the generator's last convolution."""
    first = models.Generator(3, 4, 2).state_dict()
    torch.save(first, tmp_path / "first.pth")
    with pytest.raises(ValueError, match="an --attention generator of the first design .* train it again") as e:
        models.load_generator(tmp_path / "first.pth")
    assert "\n" not in str(e.value)


def test_the_sheet_shows_each_translations_map(monkeypatch):
    import epoch_end

    seen = {}
    monkeypatch.setattr(
        epoch_end, "labelled_grid", lambda rows, labels, columns: seen.update(rows=rows, columns=columns)
    )
    G_A2B, G_B2A = models.AttentionGenerator(3, 1).eval(), models.AttentionGenerator(3, 1).eval()
    samples = {"A": [torch.rand(3, 16, 16) * 2 - 1], "B": [torch.rand(3, 16, 16) * 2 - 1]}
    epoch_end.sample_sheet(
        G_A2B, G_B2A, samples, torch.device("cpu"), torch.contiguous_format, contextlib.nullcontext()
    )
    assert seen["columns"] == ["real", "translated", "reconstructed", "identity", "attention"]
    _, a = G_B2A(samples["B"][0][None], attention=True)
    assert (seen["rows"][1][4] == epoch_end.tensor2image(a[0] * 2 - 1)).all()  # row B1: G_B2A's map, grey as RGB


def test_attention_needs_as_many_channels_in_as_out():
    args = train_py.get_parser().parse_args(["--attention", "--input_nc", "1", "--lambda_identity", "0"])
    with pytest.raises(train_py.UserError, match="^--attention blends each translation with its input"):
        train_py.check_args(args)


def write_masks(folder):
    """Masks of the data fixture's first two test/A images, black (the object) on the same rectangle: the second's
    file at half the size; the third image has none."""
    folder.mkdir()
    mask = Image.new("L", (28, 30), 255)
    mask.paste(0, (4, 6, 14, 20))
    mask.save(folder / "img 0 RGB.png")
    mask.resize((14, 15), Image.NEAREST).save(folder / "img 1 RGB.png")
    return folder


def test_the_probe_measures_the_map_where_the_masks_are_black(data, tmp_path):
    images, paths = datasets.test_images(data, "A", 3, train_py.PROBE_IMAGES, 24)
    masks, kept = datasets.object_masks(write_masks(tmp_path / "masks"), paths, 24)
    assert kept == [0, 1] and masks.shape == (2, 1, 24, 24) and torch.equal(masks[0], masks[1])
    assert masks[0, 0, 11, 7] and not masks[0, 0, 0, 0]  # the rectangle's centre, scaled by 24/28; a corner
    images = torch.stack([images[i] for i in kept])
    G = models.AttentionGenerator(3, 1)
    probe = report.MapProbe(G, images, masks)
    G.map = lambda x: (~masks).float()  # 0 exactly on the object, 1 off it
    assert probe() == {"map_B_object": 0.0, "map_B_rest": 1.0}
    G.map = lambda x: (x[:, :1] + 1) / 2  # the images' red, scaled to [0, 1]: the probe shows G its images
    red = (images[:, :1] + 1) / 2
    assert probe() == {"map_B_object": red[masks].mean().item(), "map_B_rest": red[~masks].mean().item()}
    args = train_py.get_parser().parse_args(["--dataroot", str(data), "--attention", "--mask_dir", str(tmp_path)])
    run = SimpleNamespace(device=torch.device("cpu"), memory_format=torch.contiguous_format, nets={"G_A2B": G})
    with pytest.raises(train_py.UserError, match=r"^--mask_dir .*: no readable mask named as one of the first 32"):
        train_py.map_probe(args, run)  # tmp_path holds no image named as a test image


@pytest.mark.slow
def test_an_attention_run_resumes_bit_for_bit_and_shows_its_maps(data, tmp_path):
    """--amp, FID (the tests' tiny extractor), sheets and figures on, the maps followed on masked test images;
    SIGKILL at the first epoch's end (before its sheet), so the resumed run trains the second epoch from the
    checkpoint."""
    flags = ["--attention", "--amp", "--lambda_sparsity", "-0.1"]
    probe = ["--mask_dir", write_masks(tmp_path / "masks")]
    ref, out = tmp_path / "reference", tmp_path / "run"
    r = train(data, ref, *flags)  # without the probe, which changes no weight
    assert r.returncode == 0, r.stderr
    r = train(data, out, *flags, *probe, kill_before="sheet", env={"KILL_EPOCH": "1"})
    assert r.returncode == -signal.SIGKILL
    assert not (out / "samples" / "epoch_001.png").exists()
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)  # as a run of the flag's first name saved it
    ckpt["args"]["lambda_floor"] = -ckpt["args"].pop("lambda_sparsity")
    torch.save(ckpt, out / "checkpoint.pth")
    r = train(data, out, "--resume")
    assert r.returncode == 0, r.stderr
    for name in NETS:
        assert_same_weights(out / f"net{name}.pth", ref / f"net{name}.pth")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["attention"] and "attention.9.weight" in ckpt["G_A2B"]
    rows = {run: list(csv.DictReader((run / "losses.csv").open())) for run in (ref, out)}
    assert {"loss_map", "map_A", "map_B", "map_B_object", "map_B_rest"} <= set(rows[out][0])
    assert [(r["map_A"], r["map_B"]) for r in rows[out]] == [(r["map_A"], r["map_B"]) for r in rows[ref]]
    maps = ("map_A", "map_B", "map_B_object", "map_B_rest")
    assert all(0 <= float(r[m]) <= 1 for r in rows[out] for m in maps)
    images, paths = datasets.test_images(data, "A", 3, train_py.PROBE_IMAGES, 24)  # the last row: the final G_A2B's
    masks, kept = datasets.object_masks(tmp_path / "masks", paths, 24)
    with torch.no_grad():
        a = models.load_generator(out / "netG_A2B.pth").map(torch.stack([images[i] for i in kept]))
    assert float(rows[out][-1]["map_B_object"]) == pytest.approx(a[masks].mean().item(), abs=1e-6)
    assert float(rows[out][-1]["map_B_rest"]) == pytest.approx(a[~masks].mean().item(), abs=1e-6)
    first = {k: v for k, v in ckpt["G_A2B"].items() if not k.startswith("attention.")}
    torch.save({**ckpt, "G_A2B": first}, tmp_path / "first_design.pth")
    r = train(data, tmp_path / "branch", "--resume", tmp_path / "first_design.pth")
    assert r.returncode == 1 and "an --attention run of the first design" in r.stderr, r.stderr
    release = models.AttentionGenerator(3, 1, depth=2).state_dict()
    five_px = {**first, **{k: v for k, v in release.items() if k.startswith("attention.")}}
    torch.save({**ckpt, "G_A2B": five_px}, tmp_path / "release.pth")
    r = train(data, tmp_path / "branch", "--resume", tmp_path / "release.pth")
    assert r.returncode == 1 and "an --attention run with a 5 px map network" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "branch").exists()
    for sheet in ("samples/epoch_001.png", "samples/epoch_002.png"):
        assert Image.open(out / sheet).tobytes() == Image.open(ref / sheet).tobytes()
    t = run_script("test.py", "--dataroot", data, "--output_dir", out, "--n_cpu", "0")
    assert t.returncode == 0, t.stderr
    maps = sorted((out / "attention_B").iterdir())
    assert len(maps) == 3 and all(Image.open(m).mode == "L" and Image.open(m).size == (28, 30) for m in maps)
    assert len(list((out / "attention_A").iterdir())) == 2
    index = Links()
    index.feed((out / "index.html").read_text())
    assert (
        "attention_B/img%200%20RGB.png" in index.links and "G_A2B&#x27;s attention" in (out / "index.html").read_text()
    )
    page = Links()
    page.feed((out / "training.html").read_text())
    assert sheet in page.links and "index.html" in page.links
    assert all((out / "plots" / f"{name}.svg").is_file() for name in ("map_B", "map_B_object", "map_B_rest"))


@pytest.mark.slow
def test_an_attention_run_with_two_discriminator_scales_under_torchrun_with_amp(data, tmp_path):
    """Both research options and --amp in one torchrun job (the suite has 10 minutes; each is also tested alone)."""
    r = torchrun(
        tmp_path,
        2,
        "--dataroot",
        data,
        "--output_dir",
        tmp_path / "ddp",
        *FAST,
        "--attention",
        "--size",
        "48",
        "--d_scales",
        "2",
        "--display_freq",
        "1",
        "--amp",
    )
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and "attention.9.weight" in ckpt["G_B2A"]
    assert len([k for k in ckpt["D_B"] if k.endswith("model.0.weight")]) == 2
