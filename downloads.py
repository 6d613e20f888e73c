"""The CycleGAN authors' downloads: their data sets and pretrained generators, resumable and bounded.

    python datasets.py list                          # the data sets (with sizes) and pretrained generators
    python datasets.py download horse2zebra          # -> datasets/horse2zebra/{train,test}/{A,B}
    python datasets.py pretrained horse2zebra        # -> pretrained/horse2zebra.pth

Every transfer is bounded (a listed size with a margin, a throughput floor, free disk checked first) and every
failure says what was kept: a cut download resumes from its .part file when run again.
"""

import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from files import open_new
from models import load_generator

DATASET_URLS = (
    "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets",  # current location
    "https://people.eecs.berkeley.edu/~taesung_park/CycleGAN/datasets",
)  # older one, tried second
PRETRAINED_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models"
# Zip sizes in bytes as TensorFlow Datasets recorded them (cycle_gan checksums); ae_photos' size is not known.
DATASETS = {
    "apple2orange": 78456409,
    "summer2winter_yosemite": 132640856,
    "horse2zebra": 116867962,
    "monet2photo": 305231073,
    "cezanne2photo": 279885071,
    "ukiyoe2photo": 292946532,
    "vangogh2photo": 306590349,
    "maps": 1476754427,
    "cityscapes": 279601602,
    "facades": 35135868,
    "iphone2dslr_flower": 339964458,
    "ae_photos": None,
}
PRETRAINED = (
    "horse2zebra",
    "zebra2horse",
    "summer2winter_yosemite",
    "winter2summer_yosemite",
    "apple2orange",
    "orange2apple",
    "monet2photo",
    "style_monet",
    "style_cezanne",
    "style_ukiyoe",
    "style_vangogh",
    "sat2map",
    "map2sat",
    "facades_photo2label",
    "facades_label2photo",
    "cityscapes_photo2label",
    "cityscapes_label2photo",
    "iphone2dslr_flower",
)
TIMEOUT = (10, 60)  # seconds to connect, and to wait for the next bytes before resuming
CHUNK = 1 << 16  # bytes per read at most; a cut loses the read it interrupts, the next try asks for it again
STALL = (60, 1 << 16)  # fewer bytes than STALL[1] in STALL[0] seconds is a stall, however steadily they trickle in
# A body may exceed the listed size by this fraction (plus 1 MiB); without a listed size, data sets may be 1 GiB and
# generators 100 MB (the authors' 9-block generators are 45 MB).
SIZE_MARGIN, UNLISTED_ZIP, UNLISTED_PTH = 0.05, 1 << 30, 100 << 20
UNPACK_RATIO = 4  # an archive may unpack to at most 4x its size (JPEGs barely compress: a zip bomb does)


class Stalled(requests.ConnectionError):
    """The transfer went on, but slower than the STALL floor."""


def free_bytes(folder):
    return shutil.disk_usage(folder).free


def check_free(folder, need, what):
    """ValueError unless folder's file system has `need` bytes free (and 64 MiB besides)."""
    free = free_bytes(folder)
    if need + (64 << 20) > free:
        raise ValueError(
            f"{what} needs {need / 1e6:.0f} MB of disk in {folder}, and {free / 1e6:.0f} MB are free: "
            f"free some space (or pass another --root) and run again"
        )


def http_session(retries):
    """A requests session that retries connection errors and 429/5xx answers with exponential backoff."""
    retry = Retry(
        total=retries, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504), allowed_methods={"GET"}
    )
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def download(session, url, part, retries, limit):
    """Fetch url into the file `part`, resuming what it holds with a Range request; returns part once complete.

    The adapter retries until a response starts; a transfer cut, silent for TIMEOUT[1] s or slower than the STALL
    floor resumes here, up to `retries` times in a row without progress. The file never grows past `limit` bytes:
    a larger declared length is refused before anything is written, a longer body is cut off (ValueError)."""
    failures = 0
    while True:
        start = part.stat().st_size if part.exists() else 0
        headers = {
            "Accept-Encoding": "identity",
            **({"Range": f"bytes={start}-"} if start else {}),
        }  # byte counts = file
        stalled = False
        with session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
            content_range = r.headers.get("Content-Range", "")
            if r.status_code == 416 and content_range == f"bytes */{start}":
                return part  # it was complete already
            if r.status_code == 416 or (r.status_code == 206 and not content_range.startswith(f"bytes {start}-")):
                part.unlink()  # the ranges do not line up (the file changed?): start over
                failures += 1
                if failures > retries:
                    raise requests.ConnectionError(f"the server's ranges never matched {part.name}")
                continue
            r.raise_for_status()
            if r.status_code == 200:
                start = 0  # the server ignored Range (or none was asked): the body is the whole file
            length = r.headers.get("Content-Length", "")
            total = start + int(length) if length.isdigit() else None
            if total is not None and total > limit:
                raise ValueError(
                    f"{url} declares {total / 1e6:.1f} MB, more than the {limit / 1e6:.1f} MB expected "
                    f"of {part.name[:-5]}: refused before writing anything"
                )
            check_free(part.parent, (total or limit) - start, f"downloading {part.name[:-5]}")
            try:
                with (
                    open_append(part) if start else open_new(part) as f,
                    tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=part.name[:-5]) as bar,
                ):
                    size, window = start, (time.monotonic(), start)
                    while chunk := r.raw.read1(CHUNK, decode_content=True):
                        if size + len(chunk) > limit:
                            raise ValueError(
                                f"{url} sent more than the {limit / 1e6:.1f} MB expected of "
                                f"{part.name[:-5]}: stopped there"
                            )
                        f.write(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
                        now = time.monotonic()
                        if now - window[0] >= STALL[0]:
                            if size - window[1] < STALL[1]:
                                raise Stalled(f"fewer than {STALL[1]} bytes in {STALL[0]} s")
                            window = (now, size)
            except Stalled:
                stalled = True
            except (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError):
                pass  # cut or silent: resume below (an error of our own disk is no network error: it propagates)
        size = part.stat().st_size
        if total is None and not stalled or size == total:
            return part
        failures = 0 if size > start and not stalled else failures + 1
        if failures > retries:
            how = "slower than the stall floor" if stalled else f"stopped at {size} of {total} bytes"
            raise requests.ConnectionError(f"the transfer was {how} {failures} times in a row")
        time.sleep(0.5 * (2**failures - 1))  # no wait after a transfer that made progress


def open_append(path):
    """path opened to append to, never through a symbolic link."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)), "ab")


def reason(e):
    """A few words on why a request failed: 'HTTP 404', 'Connection refused', 'timed out', ..."""
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code}"
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(e))
    if errno:
        return errno[1]
    if isinstance(e, requests.Timeout):
        return "timed out"
    return str(e).split("Caused by ")[-1]  # urllib3's root cause, e.g. ResponseError('too many 503 error responses')


def fetch(urls, dest, retries, by_hand, limit):
    """Download the first of urls that answers into dest + '.part' and return that path; ValueError if none does.
    limit: the most bytes the file may have (see download)."""
    part = dest.with_name(dest.name + ".part")
    if part.is_symlink():
        raise ValueError(f"{part} is a symbolic link, and a download never writes through one: delete it and run again")
    errors = []
    with http_session(retries) as session:
        for url in urls:
            try:
                return download(session, url, part, retries, limit)
            except requests.RequestException as e:
                errors.append(f"{url}: {reason(e)}")
            except ValueError as e:  # too large: what came is no use
                part.unlink(missing_ok=True)
                raise ValueError(f"{e}; deleted {part}") from None
            except OSError as e:  # our side: a full disk, a folder we may not write to
                kept = f"{part} keeps {part.stat().st_size} bytes" if part.is_file() else "nothing was kept"
                raise ValueError(
                    f"could not write {part} ({e.strerror or e}); {kept}: free space (or fix the "
                    f"folder) and run again to resume, or delete it"
                ) from None
    kept = (
        f"; {part} keeps {part.stat().st_size} bytes for the next try (delete it to start afresh)"
        if part.exists()
        else ""
    )
    raise ValueError(f"could not download {dest.name} ({'; '.join(errors)}){kept}. {by_hand}")


def unsafe(info):
    """Whether a zip entry is absolute, climbs out with '..', or is a symbolic link."""
    parts = info.filename.replace("\\", "/").split("/")
    absolute = info.filename.startswith(("/", "\\")) or ":" in parts[0]  # posix root, Windows root or drive
    return absolute or ".." in parts or stat.S_ISLNK(info.external_attr >> 16)


SPLIT_DOMAIN = r"(train|test|val)([AB])"  # the authors' folder names: trainA, testB, ...


def extract(zip_path, target):
    """Unzip into target (NAME/trainA ... becomes train/A ...) through a temporary folder renamed into place."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"CRC check failed for {bad}")
            entry = next((i.filename for i in zf.infolist() if unsafe(i)), None)
            if entry is not None:
                raise ValueError(f"{zip_path} holds {entry!r}, an absolute path, '..' or link: refusing to extract it")
            entry = next(
                (i.filename for i in zf.infolist() if any(len(part.encode()) > 255 for part in i.filename.split("/"))),
                None,
            )
            if entry is not None:
                raise ValueError(
                    f"{zip_path} holds a name longer than a file system allows (255 bytes): "
                    f"{entry[:80]!r}...: refusing to extract it"
                )
            unpacked, packed = sum(i.file_size for i in zf.infolist()), zip_path.stat().st_size
            if unpacked > UNPACK_RATIO * packed + (1 << 20):  # the sizes zipfile will hold each member to
                raise ValueError(
                    f"{zip_path} would unpack to {unpacked / 1e6:.0f} MB from {packed / 1e6:.1f} MB, "
                    f"over {UNPACK_RATIO}x (a zip bomb?): refusing to extract it"
                )
            check_free(target.parent, unpacked, f"unpacking {zip_path.name}")
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
            try:
                zf.extractall(tmp)
                entries = list(tmp.iterdir())
                top = len(entries) == 1 and entries[0].is_dir() and not re.fullmatch(SPLIT_DOMAIN, entries[0].name)
                content = entries[0] if top else tmp  # the authors' zips hold NAME/trainA ...
                for d in list(content.iterdir()):
                    m = re.fullmatch(SPLIT_DOMAIN, d.name)
                    if m and d.is_dir():
                        (content / m[1]).mkdir(exist_ok=True)
                        d.rename(content / m[1] / m[2])
                missing = missing_domains(content)
                if missing:
                    raise ValueError(
                        f"{zip_path} is not a CycleGAN data set: it holds no {', '.join(missing)} "
                        f"(nor {', '.join(m.replace('/', '') for m in missing)})"
                    )
                content.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f"{zip_path} is corrupt ({e})") from None


DOMAINS = ("train/A", "train/B", "test/A", "test/B")


def missing_domains(root):
    """Which of the four domain folders root lacks, in either layout."""
    return [d for d in DOMAINS if not (root / d).is_dir() and not (root / d.replace("/", "")).is_dir()]


def describe(root):
    """'train/A: 1231 files, ...' for the domain folders under root, in either layout ('' if none)."""
    folders = [
        d
        for split in ("train", "test", "val")
        for domain in "AB"
        for d in (root / split / domain, root / f"{split}{domain}")
        if d.is_dir()
    ]
    return ", ".join(f"{d.relative_to(root).as_posix()}: {sum(1 for _ in d.iterdir())} files" for d in folders)


def download_dataset(name, root="datasets", base_url=None, retries=5):
    """The authors' data set NAME as root/NAME/{train,test}/{A,B}; does nothing if it is already there."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    root, urls = Path(root), [f"{u}/{name}.zip" for u in ([base_url.rstrip("/")] if base_url else DATASET_URLS)]
    target, zip_path = root / name, root / f"{name}.zip"
    if target.exists():
        missing = missing_domains(target)
        if len(missing) == len(DOMAINS):
            raise ValueError(
                f"{target} exists but holds no train/A, train/B, test/A or test/B: move it away and run again"
            )
        if missing:
            raise ValueError(f"{target} is incomplete (no {', '.join(missing)}): move it away and run again")
        print(f"{target} is already there ({describe(target)}); nothing to do")
        return target
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{name}.extract-*"):  # left by an extraction that was killed
        shutil.rmtree(stale)
    downloaded = not zip_path.exists()  # a zip already there (fetched by hand, or by a run cut while unzipping) is used
    if downloaded:
        by_hand = (
            f"Fetch {urls[0]} by hand and unzip it into {root}/ (it holds {name}/trainA ...), "
            f"or save it as {zip_path} and run this again"
        )
        limit = DATASETS[name] + int(SIZE_MARGIN * DATASETS[name]) + (1 << 20) if DATASETS[name] else UNLISTED_ZIP
        fetch(urls, zip_path, retries, by_hand, limit).replace(zip_path)
    try:
        extract(zip_path, target)
    except ValueError as e:
        if downloaded:
            zip_path.unlink()
        raise ValueError(
            f"{e}; "
            + (
                "deleted it: run again to download it afresh"
                if downloaded
                else "delete it and run again to download it"
            )
        ) from None
    except OSError as e:  # a full disk, say: the archive is good, and kept for the next try
        raise ValueError(
            f"could not unpack {zip_path} into {root} ({e.strerror or e}); nothing was unpacked, and "
            f"{zip_path} ({zip_path.stat().st_size / 1e6:.1f} MB) is kept: free space and run again "
            f"to unpack it, or delete it"
        ) from None
    if downloaded:
        zip_path.unlink()
    print(f"{target}: {describe(target)}" + ("" if downloaded else f" (kept {zip_path}, which was there before)"))
    return target


def download_pretrained(name, root="pretrained", base_url=None, retries=5):
    """The authors' pretrained generator NAME as root/NAME.pth, checked to load; does nothing if it is there."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained generator {name!r}; known: {', '.join(PRETRAINED)}")
    root, url = Path(root), f"{(base_url or PRETRAINED_URL).rstrip('/')}/{name}.pth"
    dest = root / f"{name}.pth"
    if dest.exists():
        print(f"{dest} is already there; nothing to do")
        return dest
    root.mkdir(parents=True, exist_ok=True)
    part = fetch([url], dest, retries, f"Fetch {url} by hand and save it as {dest}", UNLISTED_PTH)
    try:
        load_generator(part)
    except ValueError as e:
        part.unlink()
        raise ValueError(f"{url} is not a generator, deleted it ({e})") from None
    part.replace(dest)
    print(f"saved {dest}")
    return dest


def print_list():
    """The downloadable data sets with their sizes, and the pretrained generators."""
    print("data sets (python datasets.py download NAME):")
    for name, size in DATASETS.items():
        print(f"  {name:24s} {f'{size / 1e6:7.1f} MB' if size else '   size unknown'}")
    print("pretrained generators (python datasets.py pretrained NAME):")
    print("  " + ", ".join(PRETRAINED))
