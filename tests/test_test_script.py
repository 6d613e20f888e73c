from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from conftest import FAST, make_dataset, run_script, write_image
from datasets import load_image, to_tensor
from models import Generator
from test_bad_files import truncated_jpeg


def save_generators(folder, nc_A=3, nc_B=3, authors=False):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, G in (("netG_A2B", Generator(nc_A, nc_B)), ("netG_B2A", Generator(nc_B, nc_A))):
        state = dict(G.state_dict())
        if authors:  # the released files carry InstanceNorm running stats
            state.update({f"model.{i}.running_mean": torch.zeros(1) for i in (2, 5, 8)})
        torch.save(state, folder / f"{name}.pth")
    return folder


def page_links(page):
    """The src and href values of an HTML page, after checking that each names a file that exists."""
    links = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            links.extend(v for k, v in attrs if k in ("src", "href"))

    Links().feed(page.read_text(encoding="utf-8"))
    for link in links:
        assert "://" not in link and not link.startswith("/"), link  # relative: opens from disk, folder can move
        assert (page.parent / unquote(link)).is_file(), link
    return links


@pytest.mark.slow
def test_every_image_keeps_its_own_size_and_name(tmp_path):
    data = tmp_path / "d"
    write_image(data / "test" / "A" / "summer day.jpg", "RGB", (333, 517))
    write_image(data / "test" / "A" / "tiny.png", "RGBA", (5, 3))
    write_image(data / "test" / "A" / "odd.png", "I;16", (37, 29))
    for i in range(3):
        write_image(data / "test" / "B" / f"w{i}.png", "RGB", (64, 48), seed=i)  # equal sizes: batched
    nets = save_generators(tmp_path / "nets", authors=True)
    out = tmp_path / "out"
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
        "--batchSize",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(out / "B" / "summer day.png").size == (333, 517)
    assert Image.open(out / "B" / "tiny.png").size == (5, 3)
    assert Image.open(out / "B" / "odd.png").size == (37, 29)
    assert sorted(p.name for p in (out / "A").iterdir()) == ["w0.png", "w1.png", "w2.png"]
    # The results page: source copy, translation and cycle reconstruction of every image, at its size.
    assert (
        Image.open(out / "rec_A" / "summer day.png").size
        == Image.open(out / "real_A" / "summer day.png").size
        == (333, 517)
    )
    links = page_links(out / "index.html")
    for name in ("summer%20day.png", "tiny.png", "odd.png"):
        assert {f"real_A/{name}", f"B/{name}", f"rec_A/{name}"} <= set(links)
    assert {"real_B/w1.png", "A/w1.png", "rec_B/w1.png"} <= set(links)


@pytest.mark.slow
def test_batched_and_single_translation_agree(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=1, n_B=3, size=(48, 40))
    nets = save_generators(tmp_path / "nets")
    outs = []
    for bs in (1, 3):
        out = tmp_path / f"out{bs}"
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
            "--batchSize",
            bs,
        )
        assert r.returncode == 0, r.stderr
        outs.append([np.asarray(Image.open(p), dtype=int) for p in sorted((out / "A").iterdir())])
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(*outs))


@pytest.mark.slow
def test_grayscale_generators(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=1, n_B=1, modes=("RGB",))
    nets = save_generators(tmp_path / "nets", 1, 1)
    r = run_script(
        "test.py",
        "--dataroot",
        data,
        "--input_nc",
        "1",
        "--output_nc",
        "1",
        "--generator_A2B",
        nets / "netG_A2B.pth",
        "--generator_B2A",
        nets / "netG_B2A.pth",
        "--output_dir",
        tmp_path / "o",
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(next((tmp_path / "o" / "B").iterdir())).mode == "L"


@pytest.mark.slow
def test_a_wrong_checkpoint_is_one_clear_line(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=1, n_B=1)
    nets = save_generators(tmp_path / "nets", 1, 1)
    r = run_script(
        "test.py",
        "--dataroot",
        data,
        "--generator_A2B",
        nets / "netG_A2B.pth",
        "--generator_B2A",
        nets / "netG_B2A.pth",
        "--output_dir",
        tmp_path / "o",
    )
    assert r.returncode != 0 and "is not a 3->3 channel" in r.stderr and "Traceback" not in r.stderr
    r = run_script("test.py", "--dataroot", data, "--output_dir", tmp_path / "o", cwd=tmp_path)
    assert r.returncode != 0 and "train first" in r.stderr and "Traceback" not in r.stderr
    r = run_script(
        "test.py",
        "--dataroot",
        tmp_path / "nowhere",
        "--generator_A2B",
        nets / "netG_A2B.pth",
        "--generator_B2A",
        nets / "netG_B2A.pth",
        "--input_nc",
        "1",
        "--output_nc",
        "1",
    )
    assert r.returncode != 0 and "python datasets.py demo" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_clear_line(tmp_path):
    r = run_script("test.py", "--cuda")
    assert r.returncode != 0 and "drop --cuda" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_psnr_against_ground_truth_is_reported(tmp_path):
    from datasets import make_demo

    data = make_demo(tmp_path / "demo", size=24, n_train=1, n_test=3)
    nets = save_generators(tmp_path / "nets")
    r = run_script(
        "test.py",
        "--dataroot",
        data,
        "--generator_A2B",
        nets / "netG_A2B.pth",
        "--generator_B2A",
        nets / "netG_B2A.pth",
        "--output_dir",
        tmp_path / "o",
        "--n_cpu",
        "0",
    )
    assert r.returncode == 0, r.stderr
    mse = [
        np.mean(
            (
                np.asarray(Image.open(data / "test" / "A" / f"{k:04d}.png"), dtype=float)
                - np.asarray(Image.open(data / "test" / "truth_B" / f"{k:04d}.png"), dtype=float)
            )
            ** 2
        )
        for k in range(3)
    ]
    baseline = np.mean([10 * np.log10(255**2 / m) for m in mse])
    assert f"do-nothing baseline, test/A itself: {baseline:.2f} dB" in r.stdout


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_named(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=1, n_B=1)
    write_image(data / "test" / "A" / "big.png", "RGB", (52, 44))
    write_image(data / "test" / "A" / "small.png", "L", (13, 9))
    cut = truncated_jpeg(data / "test" / "A" / "cut.jpg")  # its header is fine: fails in a loader worker
    (data / "test" / "A" / "empty.png").write_bytes(b"")  # caught by the header scan
    nets = save_generators(tmp_path / "nets")
    out = tmp_path / "o"
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
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (out / "B").iterdir()) == ["big.png", "img 0 RGB.png", "small.png"]
    assert Image.open(out / "B" / "big.png").size == (52, 44) and Image.open(out / "B" / "small.png").size == (13, 9)
    summary = r.stdout.split("skipped 2 image(s):")[1]
    assert f"{cut}: cannot be decoded" in summary and f"{data / 'test' / 'A' / 'empty.png'}: empty file" in summary
    assert "cut.jpg" in (out / "index.html").read_text()
    page_links(out / "index.html")


@pytest.mark.slow
def test_after_train_with_an_output_dir_test_needs_no_generator_flags(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=2, n_B=1)
    run_dir = tmp_path / "runs" / "x"
    r = run_script("train.py", "--dataroot", data, "--output_dir", run_dir, *FAST, "--size", "24")
    assert r.returncode == 0, r.stderr
    r = run_script("test.py", "--dataroot", data, "--output_dir", run_dir, "--n_cpu", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list((run_dir / "B").iterdir())) == 2 and len(list((run_dir / "A").iterdir())) == 1


def test_one_image_is_rounded_exactly_as_the_seeds_save_image(tmp_path):
    photo = write_image(tmp_path / "in" / "my photo.png", "RGB", (40, 36))  # multiples of 4: no padding
    torch.manual_seed(0)
    G = Generator(3, 3).eval()
    torch.save(G.state_dict(), tmp_path / "g.pth")
    out = tmp_path / "o"
    r = run_script("test.py", "--input", photo, "--generator", tmp_path / "g.pth", "--output_dir", out)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():  # the seed's test code
        fake_B = 0.5 * (G(to_tensor(load_image(photo))[None]) + 1.0)
    save_image(fake_B, tmp_path / "seed.png")
    ours, seed = (np.asarray(Image.open(p)) for p in (out / "B" / "my photo.png", tmp_path / "seed.png"))
    assert np.array_equal(ours, seed)
    truncated = (fake_B[0].clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()  # the old conversion
    assert not np.array_equal(truncated, seed)
    assert np.array_equal(np.asarray(Image.open(out / "real_A" / "my photo.png")), np.asarray(Image.open(photo)))
    assert sorted(page_links(out / "index.html")) == sorted(["real_A/my%20photo.png", "B/my%20photo.png"] * 2)


@pytest.mark.slow
def test_a_folder_of_any_images_in_one_direction(tmp_path):
    folder = tmp_path / "photos & <more>"
    for i, (mode, size) in enumerate([("RGBA", (37, 29)), ("I;16", (21, 50)), ("L", (64, 48)), ("CMYK", (30, 31))]):
        write_image(
            folder / f"shot {i} {mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}", mode, size, seed=i
        )
    (folder / "shot 2 L.png").rename(folder / "shot 2 #1 & <b>.png")  # characters that need escaping
    (folder / "Thumbs.db").write_bytes(bytes(64))
    nets = save_generators(tmp_path / "nets")
    out = tmp_path / "o"
    r = run_script(
        "test.py",
        "--input",
        folder,
        "--generator",
        nets / "netG_B2A.pth",
        "--direction",
        "BtoA",
        "--output_dir",
        out,
        "--n_cpu",
        "8",
    )
    assert r.returncode == 0, r.stderr
    assert "excessive worker creation" not in r.stderr  # workers: min(--n_cpu, CPUs, images)
    sizes = {p.name: Image.open(p).size for p in (out / "A").iterdir()}
    assert sizes == {
        "shot 0 RGBA.png": (37, 29),
        "shot 1 I16.png": (21, 50),
        "shot 2 #1 & <b>.png": (64, 48),
        "shot 3 CMYK.png": (30, 31),
    }
    assert not (out / "B").exists() and not (out / "rec_B").exists()  # one generator: no reconstruction
    links = page_links(out / "index.html")
    assert len(links) == 4 * 2 * 2 and "real_B/shot%200%20RGBA.png" in links
    page = (out / "index.html").read_text()
    assert "shot 3 CMYK.jpg" in page and "shot 2 #1 &amp; &lt;b&gt;.png" in page and "http" not in page.lower()


@pytest.mark.slow
def test_input_mode_errors_are_one_line(tmp_path):
    nets = save_generators(tmp_path / "nets")
    r = run_script("test.py", "--input", tmp_path / "nowhere.jpg", "--generator", nets / "netG_A2B.pth")
    assert r.returncode != 0 and "--input" in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "fake.jpg").write_text("text")
    r = run_script(
        "test.py",
        "--input",
        tmp_path / "fake.jpg",
        "--generator",
        nets / "netG_A2B.pth",
        "--output_dir",
        tmp_path / "o",
    )
    assert r.returncode != 0 and "nothing was translated" in r.stderr and "Traceback" not in r.stderr
    assert "fake.jpg: not an image file" in r.stdout
