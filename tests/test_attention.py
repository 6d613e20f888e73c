"""--attention (generators that say where they translate): the blend with the input, the file test.py recognises,
the maps in the sheets, on disk and on both pages; an attention run resumes bit for bit after SIGKILL (with --amp,
FID during training, figures) and runs under torchrun."""

import contextlib
import signal

import pytest
import torch
from PIL import Image

import models
import translation
from conftest import FAST, make_dataset, run_script
from test_ddp import torchrun
from test_epoch_end import Links, assert_same_weights, train

pytestmark = pytest.mark.slow  # every test here trains or starts servers for seconds

NETS = ("G_A2B", "G_B2A", "D_A", "D_B")


def last_filters(state):
    return [v for k, v in state.items() if k.endswith(".weight")][-1].shape[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_A=3, n_B=2, size=(28, 30))


def test_the_map_blends_the_content_with_the_input():
    G = models.AttentionGenerator(3, 1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    last = G.model[-1]
    with torch.no_grad():
        last.bias[-1] = -100.0  # a = 0: the input passes unchanged
        out, a = G(x, attention=True)
        assert a.shape == (2, 1, 16, 16) and torch.allclose(out, x, atol=1e-6)
        last.bias[-1] = 100.0  # a = 1: the content alone
        assert torch.allclose(G(x), torch.tanh(G.model(x)[:, :3]), atol=1e-6)
    assert models.total_variation(torch.ones(1, 1, 5, 5)) == 0
    assert models.total_variation(torch.eye(4)[None, None]) > 0


def test_the_maps_learn_from_the_adversarial_loss_and_not_from_cycle_or_identity():
    """A generator that changes nothing makes the cycle and identity losses 0: with their gradient the maps fell to 0
    on the demo. Here only the GAN term (and the TV term) reaches the map's filter; the content's get all terms."""
    torch.manual_seed(0)
    G_A2B, G_B2A = models.AttentionGenerator(3, 1), models.AttentionGenerator(3, 1)
    loss = models.GeneratorLoss(G_A2B, G_B2A, 10.0, 0.5, lambda_tv=1.0)
    (_, loss_identity, loss_gan, loss_cycle), _ = loss(
        torch.rand(1, 3, 32, 32) * 2 - 1,
        torch.rand(1, 3, 32, 32) * 2 - 1,
        models.Discriminator(3),
        models.Discriminator(3),
    )
    last = G_A2B.model[-1].weight  # (4, 64, 7, 7): 3 content filters, then the map's
    for term, map_gets_it in ((loss_gan, True), (loss_cycle, False), (loss_identity, False)):
        grad = torch.autograd.grad(term, last, retain_graph=True)[0]
        assert (grad[3].abs().sum() > 0) == map_gets_it and grad[:3].abs().sum() > 0


def test_test_py_loads_an_attention_generator_from_its_file_under_any_names(tmp_path):
    G = models.AttentionGenerator(3, 2)
    torch.save(G.state_dict(), tmp_path / "ours.pth")
    torch.save({f"layer{i}": v for i, v in enumerate(G.state_dict().values())}, tmp_path / "renamed.pth")
    x = torch.rand(1, 3, 21, 18) * 2 - 1
    want, want_map = translation.translate(G.eval(), x, attention=True)
    for name in ("ours.pth", "renamed.pth"):
        loaded = models.load_generator(tmp_path / name).eval()
        got, got_map = translation.translate(loaded, x, attention=True)
        assert type(loaded) is models.AttentionGenerator and torch.equal(got, want) and torch.equal(got_map, want_map)
    torch.save(models.Generator(3, 3, 2).state_dict(), tmp_path / "plain.pth")
    plain = models.load_generator(tmp_path / "plain.pth")
    assert type(plain) is models.Generator and translation.translate(plain, x, attention=True)[1] is None
    with pytest.raises(ValueError, match="not a 1->1 channel generator"):  # the map channel is not an image's
        models.load_generator(tmp_path / "ours.pth", 1, 1)


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
    train_py = __import__("importlib").import_module("train")
    args = train_py.get_parser().parse_args(["--attention", "--input_nc", "1", "--lambda_identity", "0"])
    with pytest.raises(train_py.UserError, match="^--attention blends each translation with its input"):
        train_py.check_args(args)


def test_an_attention_run_resumes_bit_for_bit_and_shows_its_maps(data, tmp_path):
    """--amp, FID (the tests' tiny extractor), sheets and figures on; SIGKILL at the first epoch's end (before its
    sheet), so the resumed run trains the second epoch from the checkpoint."""
    flags = ["--attention", "--amp"]
    ref, out = tmp_path / "reference", tmp_path / "run"
    r = train(data, ref, *flags)
    assert r.returncode == 0, r.stderr
    assert train(data, out, *flags, kill_before="sheet", env={"KILL_EPOCH": "1"}).returncode == -signal.SIGKILL
    assert not (out / "samples" / "epoch_001.png").exists()
    r = train(data, out, "--resume")
    assert r.returncode == 0, r.stderr
    for name in NETS:
        assert_same_weights(out / f"net{name}.pth", ref / f"net{name}.pth")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["attention"] and last_filters(ckpt["G_A2B"]) == 4  # 3 colours and the map
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
    assert ckpt["world_size"] == 2 and last_filters(ckpt["G_B2A"]) == 4
    assert len([k for k in ckpt["D_B"] if k.endswith("model.0.weight")]) == 2
