"""Files written safely: every writer goes through write_atomic, and the CSV histories a run appends to. No torch here:
figures.py redraws with this alone."""

import csv
import math
import os
import re
import secrets
from pathlib import Path


def shown(path):
    """A path as text that prints anywhere: bytes of a name that are not UTF-8 become U+FFFD."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def open_new(path, mode="wb", **kwargs):
    """Open path as a new file for writing. Whatever file was there, a planted symbolic link included, is removed
    first, never written through, and the file is created exclusively, without following links."""
    path = Path(path)
    try:
        path.unlink()  # a link itself, not its target
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, mode, **kwargs)


def temporary_name(path):
    """A name beside path that no other writer picks: .NAME.PID.RANDOM.tmp (remove_leftovers knows its pid)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_leftovers(folder):
    """Remove the temporary files in folder of writers that died mid-write (killed: their pid is gone); those of
    live writers stay."""
    for tmp in Path(folder).glob(".*.tmp"):
        found = re.fullmatch(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp", tmp.name)
        if found and not alive(int(found[1])):
            tmp.unlink(missing_ok=True)


def alive(pid):
    """Whether a process of this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def write_atomic(path, write, mode="wb", durable=False, **kwargs):
    """write(file) on a temporary file of its own beside path (opened by open_new), then os.replace: a reader sees
    the old file or the new one, never half of one; a crash or a full disk mid-write leaves the old file whole; two
    writers of one path each publish a whole file, the last one wins. durable: fsync the file and the rename
    (checkpoints). Returns path."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open_new(tmp, mode, **kwargs) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        try:
            fd = os.open(path.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass
    return path


def copy_histories(src, dst):
    """losses.csv and metrics.csv of the run in folder src, copied whole into folder dst where it has none: a run
    branched into a new folder keeps its curves (the resume then drops the rows after its checkpoint)."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return
    for name in ("losses.csv", "metrics.csv"):
        if (src / name).is_file() and not (dst / name).exists():
            write_atomic(dst / name, lambda f, name=name: f.write((src / name).read_bytes()))


def write_png(picture, path):
    """A (C, H, W) uint8 picture (numpy, or a CPU tensor; C = 1 is written gray) as PNG, atomically."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(picture).transpose(1, 2, 0)  # (H, W, C)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    return write_atomic(path, lambda f: image.save(f, format="PNG"))


def read_rows(path, text=()):
    """The complete rows of a CSV history as {column: float} (an empty cell is NaN; the columns named in `text` stay
    strings). A last line without its newline (a writer killed mid-line), a line with too many or too few cells, or
    one whose numbers do not parse is left out."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        content = f.read()
    if not content.endswith("\n"):
        content = content[: content.rfind("\n") + 1]
    rows = []
    for r in csv.DictReader(content.splitlines(keepends=True)):
        try:
            if None in r or None in r.values():
                continue
            rows.append({k: v if k in text else float(v) if v.strip() else math.nan for k, v in r.items()})
        except ValueError:
            continue
    return rows


def keep_rows(path, columns, key, last, text=()):
    """A CSV history's rows whose `key` is at most `last`, the file rewritten with just those (a resumed run redoes
    the rest); last None: a new run, and an old file is kept under another name. Cut or damaged lines are left out.
    `key` and "step" come back as ints, the rest as floats."""
    path, rows = Path(path), []
    if path.exists() and last is not None:
        rows = [
            {**r, **{k: int(r[k]) for k in (key, "step") if k in r and math.isfinite(r[k])}}
            for r in read_rows(path, text)
            if math.isfinite(r.get(key, math.nan)) and r[key] <= last
        ]
    elif path.exists():
        path.rename(path.with_name(f"{path.stem}.{int(path.stat().st_mtime)}{path.suffix}"))

    def write(f):
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: r.get(k, math.nan) for k in columns} for r in rows)

    write_atomic(path, write, "w", newline="")
    return rows


def append_row(path, columns, row):
    """One row at the end of a CSV history, flushed: a kill leaves at most a cut last line, which read_rows drops."""
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, columns).writerow(row)
