import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset, run_script, write_image
from models import Generator


def save_generators(folder, nc_A=3, nc_B=3, authors=False):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, G in (("netG_A2B", Generator(nc_A, nc_B)), ("netG_B2A", Generator(nc_B, nc_A))):
        state = dict(G.state_dict())
        if authors:  # the released files carry InstanceNorm running stats
            state.update({f"model.{i}.running_mean": torch.zeros(1) for i in (2, 5, 8)})
        torch.save(state, folder / f"{name}.pth")
    return folder


def test_every_image_keeps_its_own_size_and_name(tmp_path):
    data = tmp_path / "d"
    write_image(data / "test" / "A" / "summer day.jpg", "RGB", (333, 517))
    write_image(data / "test" / "A" / "tiny.png", "RGBA", (5, 3))
    write_image(data / "test" / "A" / "odd.png", "I;16", (37, 29))
    for i in range(3):
        write_image(data / "test" / "B" / f"w{i}.png", "RGB", (64, 48), seed=i)  # equal sizes: batched
    nets = save_generators(tmp_path / "nets", authors=True)
    out = tmp_path / "out"
    r = run_script("test.py", "--dataroot", data, "--generator_A2B", nets / "netG_A2B.pth", "--generator_B2A",
                   nets / "netG_B2A.pth", "--output_dir", out, "--n_cpu", "0", "--batchSize", "2")
    assert r.returncode == 0, r.stderr
    assert Image.open(out / "B" / "summer day.png").size == (333, 517)
    assert Image.open(out / "B" / "tiny.png").size == (5, 3)
    assert Image.open(out / "B" / "odd.png").size == (37, 29)
    assert sorted(p.name for p in (out / "A").iterdir()) == ["w0.png", "w1.png", "w2.png"]


def test_batched_and_single_translation_agree(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=1, n_B=3, size=(48, 40))
    nets = save_generators(tmp_path / "nets")
    outs = []
    for bs in (1, 3):
        out = tmp_path / f"out{bs}"
        r = run_script("test.py", "--dataroot", data, "--generator_A2B", nets / "netG_A2B.pth", "--generator_B2A",
                       nets / "netG_B2A.pth", "--output_dir", out, "--n_cpu", "0", "--batchSize", bs)
        assert r.returncode == 0, r.stderr
        outs.append([np.asarray(Image.open(p), dtype=int) for p in sorted((out / "A").iterdir())])
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(*outs))


def test_grayscale_generators(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=1, n_B=1, modes=("RGB",))
    nets = save_generators(tmp_path / "nets", 1, 1)
    r = run_script("test.py", "--dataroot", data, "--input_nc", "1", "--output_nc", "1", "--generator_A2B",
                   nets / "netG_A2B.pth", "--generator_B2A", nets / "netG_B2A.pth", "--output_dir", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert Image.open(next((tmp_path / "o" / "B").iterdir())).mode == "L"


def test_a_wrong_checkpoint_is_one_clear_line(tmp_path):
    data = make_dataset(tmp_path / "d", n_A=1, n_B=1)
    nets = save_generators(tmp_path / "nets", 1, 1)
    r = run_script("test.py", "--dataroot", data, "--generator_A2B", nets / "netG_A2B.pth",
                   "--generator_B2A", nets / "netG_B2A.pth", "--output_dir", tmp_path / "o")
    assert r.returncode != 0 and "is not a 3->3 channel" in r.stderr and "Traceback" not in r.stderr
    r = run_script("test.py", "--dataroot", data, "--output_dir", tmp_path / "o", cwd=tmp_path)
    assert r.returncode != 0 and "train first" in r.stderr and "Traceback" not in r.stderr
    r = run_script("test.py", "--dataroot", tmp_path / "nowhere", "--generator_A2B", nets / "netG_A2B.pth",
                   "--generator_B2A", nets / "netG_B2A.pth", "--input_nc", "1", "--output_nc", "1")
    assert r.returncode != 0 and "python datasets.py demo" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_clear_line(tmp_path):
    r = run_script("test.py", "--cuda")
    assert r.returncode != 0 and "drop --cuda" in r.stderr and "Traceback" not in r.stderr


def test_psnr_against_ground_truth_is_reported(tmp_path):
    from datasets import make_demo
    data = make_demo(tmp_path / "demo", size=24, n_train=1, n_test=3)
    nets = save_generators(tmp_path / "nets")
    r = run_script("test.py", "--dataroot", data, "--generator_A2B", nets / "netG_A2B.pth", "--generator_B2A",
                   nets / "netG_B2A.pth", "--output_dir", tmp_path / "o", "--n_cpu", "0")
    assert r.returncode == 0, r.stderr
    mse = [np.mean((np.asarray(Image.open(data / "test" / "A" / f"{k:04d}.png"), dtype=float) -
                    np.asarray(Image.open(data / "test" / "truth_B" / f"{k:04d}.png"), dtype=float)) ** 2) for k in range(3)]
    baseline = np.mean([10 * np.log10(255 ** 2 / m) for m in mse])
    assert f"do-nothing baseline, test/A itself: {baseline:.2f} dB" in r.stdout
