"""datasets.py download / pretrained against a loopback HTTP server that honours Range, or misbehaves on request."""

import http.server
import io
import re
import socket
import stat
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import downloads
from conftest import run_script, write_image
from datasets import domain_dir, list_images, load_image, to_tensor
from downloads import download_dataset, download_pretrained
from models import Generator, load_generator
from utils import to_uint8

NAME = "horse2zebra"
FOLDERS = {"trainA": "train/A", "trainB": "train/B", "testA": "test/A", "testB": "test/B"}


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files; server.mode picks a misbehaviour: cut, stall, busy, ignore_range, wrong_range; or, of a
    hostile server, endless (a body without end: 64 KiB writes for up to 10 s), huge_length (declares 10 TB),
    trickle (a byte every 50 ms for up to 10 s). Every loop here is bounded in bytes and time."""

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        if srv.mode in ("endless", "huge_length", "trickle"):
            self.hostile(srv.mode)
            return
        if srv.mode == "busy" and len(srv.log) == 1:
            self.send_error(503)
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, asked = 0, re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if asked and srv.mode != "ignore_range":
            start = 0 if srv.mode == "wrong_range" else int(asked[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.mode in ("cut", "stall") and len(srv.log) == 1:  # first answer: half the body, then hang up or go quiet
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if srv.mode == "stall":
                time.sleep(3)
            return  # HTTP/1.0: the connection closes with fewer bytes than Content-Length said
        self.wfile.write(body)

    def hostile(self, mode):
        self.send_response(200)
        if mode == "huge_length":
            self.send_header("Content-Length", str(10**13))
        self.end_headers()
        chunk, pause = (b"x" * (1 << 16), 0) if mode != "trickle" else (b"x", 0.05)
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                self.wfile.write(chunk)
                self.wfile.flush()
                time.sleep(pause)
        except OSError:  # the client hung up, as it should
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.log, srv.mode = {}, [], "ok"
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def png(seed):
    """An 8x8 RGB PNG file's bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def authors_zip(extra=(), compression=zipfile.ZIP_DEFLATED):
    """A data set zip as the authors ship them (NAME/trainA/...), names with spaces; `extra` adds (ZipInfo, bytes)."""
    images = {
        f"{NAME}/{folder}/{i} {folder} photo.png": png(k * 10 + i) for k, folder in enumerate(FOLDERS) for i in range(2)
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for folder in FOLDERS:
            zf.writestr(f"{NAME}/{folder}/", "")
        for name, data in images.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return buf.getvalue(), images


def resumed_at(request):
    """The start of a logged request's Range header."""
    return int(re.fullmatch(r"bytes=(\d+)-", request[1])[1])


def assert_unpacked(root, images):
    """root/NAME holds exactly the zip's images in the seed's layout, and nothing else is left in root."""
    target = root / NAME
    for name, data in images.items():
        _, folder, file = name.split("/")
        assert (target / FOLDERS[folder] / file).read_bytes() == data
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*.png")) == sorted(
        f"{FOLDERS[n.split('/')[1]]}/{n.split('/')[2]}" for n in images
    )
    assert [p.name for p in root.iterdir()] == [NAME]  # no zip, .part or temporary folder left


def test_download_unpacks_the_authors_zip_and_a_second_run_does_nothing(server, tmp_path, capsys):
    data, images = authors_zip()
    server.files[f"/{NAME}.zip"] = data
    root = tmp_path / "datasets"
    datasets.main(["download", NAME, "--root", str(root), "--base_url", server.url])
    assert_unpacked(root, images)
    assert len(list_images(domain_dir(root / NAME, "train", "A"))) == 2
    out = capsys.readouterr()
    assert "train/A: 2 files" in out.out and "B/s" in out.err  # tqdm's bytes and rate
    datasets.main(["download", NAME, "--root", str(root), "--base_url", server.url])
    assert "nothing to do" in capsys.readouterr().out
    assert len(server.log) == 1


@pytest.mark.parametrize("mode", ["cut", "stall"])
def test_cut_or_stalled_transfer_resumes_with_a_range_request(server, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(downloads, "TIMEOUT", (5, 0.5))  # a stall longer than the read timeout counts as a cut
    monkeypatch.setattr(downloads, "CHUNK", 256)  # tiny reads, so that half of a tiny zip is several of them
    data, images = authors_zip()
    server.files[f"/{NAME}.zip"], server.mode = data, mode
    download_dataset(NAME, tmp_path, server.url, retries=2)
    assert len(server.log) == 2 and server.log[0] == (f"/{NAME}.zip", None)
    assert 0 < resumed_at(server.log[1]) <= len(data) // 2  # a cut loses at most the read it interrupted
    assert_unpacked(tmp_path, images)


def test_part_file_of_an_earlier_run_is_resumed(server, tmp_path):
    data, images = authors_zip()
    server.files[f"/{NAME}.zip"] = data
    (tmp_path / f"{NAME}.zip.part").write_bytes(data[:1000])
    download_dataset(NAME, tmp_path, server.url, retries=0)
    assert server.log == [(f"/{NAME}.zip", "bytes=1000-")]
    assert_unpacked(tmp_path, images)


@pytest.mark.parametrize("mode", ["ignore_range", "wrong_range"])
def test_server_that_ignores_or_misaligns_ranges_starts_over_cleanly(server, tmp_path, mode):
    data, _ = authors_zip()
    server.files[f"/{NAME}.zip"], server.mode = data, mode
    (tmp_path / f"{NAME}.zip.part").write_bytes(b"x" * 700)  # must not survive (zipfile would skip a junk prefix)
    part = downloads.fetch([f"{server.url}/{NAME}.zip"], tmp_path / f"{NAME}.zip", 1, "", 1 << 20)
    assert server.log[0] == (f"/{NAME}.zip", "bytes=700-")
    assert part.read_bytes() == data


def test_busy_server_is_retried_and_the_old_location_is_the_fallback(server, tmp_path, monkeypatch):
    data, images = authors_zip()
    server.files[f"/old/{NAME}.zip"], server.mode = data, "busy"
    monkeypatch.setattr(downloads, "DATASET_URLS", (f"{server.url}/new", f"{server.url}/old"))
    download_dataset(NAME, tmp_path, retries=1)
    assert [path for path, _ in server.log] == [f"/new/{NAME}.zip"] * 2 + [f"/old/{NAME}.zip"]  # 503, 404, 200
    assert_unpacked(tmp_path, images)


@pytest.mark.parametrize("damage", ["crc", "not a zip"])
def test_corrupt_zip_is_refused_before_anything_is_extracted(server, tmp_path, monkeypatch, damage):
    def extractall(*args, **kwargs):
        raise AssertionError("extraction began before the CRCs were checked")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", extractall)
    data, images = authors_zip(compression=zipfile.ZIP_STORED)
    if damage == "crc":
        data = bytearray(data)
        data[data.find(next(iter(images.values()))) + 40] ^= 0xFF  # inside the first image's stored bytes
    server.files[f"/{NAME}.zip"] = bytes(data) if damage == "crc" else b"<html>moved</html>"
    with pytest.raises(ValueError, match="corrupt.*deleted it"):
        download_dataset(NAME, tmp_path, server.url, retries=0)
    assert list(tmp_path.iterdir()) == []  # no data set, no half folder, and the bad zip is gone


@pytest.mark.parametrize("entry", ["dotdot", "absolute", "symlink"])
def test_archive_escaping_its_folder_is_refused(server, tmp_path, entry):
    outside = tmp_path / "outside"
    if entry == "dotdot":
        info = zipfile.ZipInfo(f"{NAME}/trainA/../../../../outside/escape.png")
    elif entry == "absolute":
        info = zipfile.ZipInfo(str(outside / "escape.png"))
    else:
        info = zipfile.ZipInfo(f"{NAME}/trainA/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
    assert info.filename.startswith("/") == (entry == "absolute")
    data, _ = authors_zip(extra=[(info, str(outside / "escape.png") if entry == "symlink" else png(99))])
    server.files[f"/{NAME}.zip"] = data
    root = tmp_path / "datasets" / "deep"
    with pytest.raises(ValueError, match="refusing"):
        download_dataset(NAME, root, server.url, retries=0)
    assert not outside.exists() and list(root.iterdir()) == []
    assert [p for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink()] == []


def test_interrupted_extraction_leaves_no_half_data_set(server, tmp_path, monkeypatch):
    data, images = authors_zip()
    server.files[f"/{NAME}.zip"] = data
    real_extractall = zipfile.ZipFile.extractall

    def extract_some_then_interrupt(self, path=None, members=None, pwd=None):
        for info in self.infolist()[:6]:
            self.extract(info, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(zipfile.ZipFile, "extractall", extract_some_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        download_dataset(NAME, tmp_path, server.url, retries=0)
    assert [p.name for p in tmp_path.iterdir()] == [f"{NAME}.zip"]  # the download is kept, no half data set
    (tmp_path / f".{NAME}.extract-killed" / "trainA").mkdir(parents=True)  # what a SIGKILL would leave
    monkeypatch.setattr(zipfile.ZipFile, "extractall", real_extractall)
    download_dataset(NAME, tmp_path, server.url, retries=0)
    assert len(server.log) == 1  # the zip in place was used
    (tmp_path / f"{NAME}.zip").unlink()  # kept, since it was there before this run
    assert_unpacked(tmp_path, images)


def test_folder_that_is_not_a_data_set_is_not_touched(tmp_path):
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="move it away"):
        download_dataset(NAME, tmp_path, "http://127.0.0.1:9", retries=0)
    assert (tmp_path / NAME / "mine.txt").read_text() == "keep"


def test_no_server_is_a_one_line_error_naming_the_url(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = run_script("datasets.py", "download", NAME, "--root", tmp_path / "d", "--base_url", url, "--retries", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"Fetch {url}/{NAME}.zip by hand and unzip it into {tmp_path / 'd'}" in r.stderr


def test_unknown_names_are_refused_naming_the_known_ones(capsys):
    for command in ("download", "pretrained"):
        with pytest.raises(ValueError, match="known: .*horse2zebra") as e:
            datasets.main([command, "horse2dog"])
        assert "\n" not in str(e.value)
    datasets.main(["list"])
    out = capsys.readouterr().out
    assert "horse2zebra                116.9 MB" in out and "ae_photos" in out and "style_monet" in out


def authors_generator_bytes():
    """A 3->3 generator in the authors' format: our keys plus InstanceNorm running stats (69 extra keys)."""
    G = Generator(3, 3)
    state = dict(G.state_dict())
    for name, m in G.named_modules():
        if isinstance(m, torch.nn.InstanceNorm2d):
            state[f"{name}.running_mean"] = torch.zeros(m.num_features)
            state[f"{name}.running_var"] = torch.ones(m.num_features)
            state[f"{name}.num_batches_tracked"] = torch.tensor(0)
    buf = io.BytesIO()
    torch.save(state, buf)
    return G, buf.getvalue()


@pytest.mark.slow
def test_pretrained_generator_is_fetched_resumed_and_loads(server, tmp_path):
    G, data = authors_generator_bytes()
    server.files["/style_monet.pth"], server.mode = data, "cut"
    datasets.main(["pretrained", "style_monet", "--root", str(tmp_path), "--base_url", server.url])
    assert len(server.log) == 2 and 0 < resumed_at(server.log[1]) <= len(data) // 2
    assert [p.name for p in tmp_path.iterdir()] == ["style_monet.pth"]
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(load_generator(tmp_path / "style_monet.pth").eval()(x), G.eval()(x))
    download_pretrained("style_monet", tmp_path, server.url)
    assert len(server.log) == 2  # already there: no request

    # test.py uses the fetched file directly, on one image and on a folder
    photos = tmp_path / "photos"
    for i in range(2):
        write_image(photos / f"p{i}.jpg", "RGB", (24 + 4 * i, 20), seed=i)
    for source, out in ((photos / "p0.jpg", tmp_path / "one"), (photos, tmp_path / "all")):
        r = run_script("test.py", "--input", source, "--generator", tmp_path / "style_monet.pth", "--output_dir", out)
        assert r.returncode == 0, r.stderr
    for out, names in ((tmp_path / "one", ["p0"]), (tmp_path / "all", ["p0", "p1"])):
        assert sorted(f.stem for f in (out / "B").iterdir()) == names
        for name in names:
            with torch.no_grad():
                want = to_uint8(G(to_tensor(load_image(photos / f"{name}.jpg"))[None])[0]).permute(1, 2, 0).numpy()
            assert np.array_equal(np.asarray(Image.open(out / "B" / f"{name}.png")), want)


def test_pretrained_file_that_is_not_a_generator_is_deleted(server, tmp_path):
    server.files["/horse2zebra.pth"] = b"<html>gone</html>"
    with pytest.raises(ValueError, match="not a generator, deleted it"):
        download_pretrained("horse2zebra", tmp_path, server.url, retries=0)
    assert list(tmp_path.iterdir()) == []


def test_missing_data_root_names_the_download_command(tmp_path):
    with pytest.raises(ValueError, match=f"python datasets.py download {NAME} --root {re.escape(str(tmp_path))}`"):
        domain_dir(tmp_path / NAME, "train", "A")
    with pytest.raises(ValueError, match="python datasets.py list"):
        domain_dir(tmp_path / "my_photos", "train", "A")
