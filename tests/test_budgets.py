"""The repository stays readable in one sitting: short functions, short files, no block written twice, no import
circle. Limits on the code as `ruff format` lays it out; never join lines to fit them."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(ROOT.glob("*.py"))  # the project's modules and scripts
SCRIPTS = sorted([*(ROOT / "bench").glob("*.py"), *(ROOT / "experiments").glob("*.py")])
TESTS = sorted((ROOT / "tests").glob("*.py"))
MAX_FUNCTION, MAX_FILE = 80, 650  # lines, every Python file
MAX_CODE = 4200  # code lines of the project's modules (3,600 when set: room for the open issues)
REPEAT = 6  # lines: a block this long written twice is a function waiting to be named


@pytest.mark.parametrize("group", ["sources", "scripts", "tests"])
def test_no_function_longer_than_80_lines(group):
    paths = {"sources": SOURCES, "scripts": SCRIPTS, "tests": TESTS}[group]
    long = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno >= MAX_FUNCTION
            ):
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_no_file_longer_than_650_lines():
    lines = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in SOURCES + SCRIPTS + TESTS}
    assert max(lines.values()) <= MAX_FILE, {name: n for name, n in lines.items() if n > MAX_FILE}


def code_lines(path):
    """(line number, text) of the lines that carry code: no blanks, comments, imports or lone brackets."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        text = re.sub(r"\s+", " ", line.split(" #")[0]).strip()
        if text and not text.startswith(("#", "import ", "from ")) and not re.fullmatch(r"[\]\)\}\[\(\{,:]+", text):
            yield i, text


def test_no_block_of_six_code_lines_is_written_twice():
    """Exact repeats only (after folding white space); the `duplicates` tool of the developers' library also finds
    blocks alike but for names."""
    seen, repeats = {}, []
    for path in SOURCES:
        lines = list(code_lines(path))
        for k in range(len(lines) - REPEAT + 1):
            block = tuple(text for _, text in lines[k : k + REPEAT])
            where = f"{path.name}:{lines[k][0]}"
            if block in seen:
                repeats.append(f"{where} ~ {seen[block]}")
            seen.setdefault(block, where)
    assert not repeats, repeats


MODULES = {p.stem for p in SOURCES}


def code_line_count(path):
    """Lines that carry code: no blanks, comments or docstrings (a module's, a class's, a function's)."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
            and isinstance(node.body[0].value.value, str)
        ):
            docs.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return sum(
        1
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if line.strip() and not line.strip().startswith("#") and i not in docs
    )


def test_code_outside_tests_stays_within_its_budget():
    lines = {p.name: code_line_count(p) for p in SOURCES}
    assert sum(lines.values()) <= MAX_CODE, lines


def imports(path):
    """The project's modules that path imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & MODULES - {path.stem}


def test_no_import_circle():
    graph = {p.stem: imports(p) for p in SOURCES}

    def circle(start, node, path):
        for nxt in sorted(graph[node]):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = circle(start, nxt, path + [nxt])
                if found:
                    return found
        return None

    circles = [" -> ".join(c) for m in sorted(graph) if (c := circle(m, m, [m]))]
    assert not circles, circles


def test_each_module_says_what_it_holds_in_its_first_line():
    for path in SOURCES:
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, f"{path.name} has no opening line saying what it holds"


def test_figures_draw_without_importing_torch(tmp_path):
    """The redraw runs at every epoch end in a process of its own: torch would cost it seconds of imports."""
    import subprocess
    import sys

    (tmp_path / "losses.csv").write_text("step,epoch,loss_G,lr,seconds\n10,0.5,1.0,0.0002,1.0\n20,1.0,0.9,0.0002,2.0\n")
    probe = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv = ['figures.py', {str(tmp_path)!r}, '--quiet']; "
        f"import runpy; runpy.run_path({str(ROOT / 'figures.py')!r}, run_name='__main__')"
    )
    check = f"import atexit, sys; atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr)); {probe}"
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip().splitlines()[-1] == "False", r.stderr
    assert (tmp_path / "training.html").is_file() and (tmp_path / "plots" / "loss_G.svg").is_file()
