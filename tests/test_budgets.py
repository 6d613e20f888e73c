"""The repository stays readable in one sitting: short functions, short files, no block written twice."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(ROOT.glob("*.py"))  # the project's modules and scripts; tests/ has budgets of its own below
MAX_FUNCTION, MAX_TRAIN, MAX_FILE, MAX_TEST_FILE = 80, 450, 550, 550
REPEAT = 6  # lines: a block this long written twice is a function waiting to be named


def test_no_function_longer_than_80_lines():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= MAX_FUNCTION:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_file_lengths():
    lines = {p.name: len(p.read_text().splitlines()) for p in SOURCES}
    assert lines["train.py"] <= MAX_TRAIN, lines
    assert max(lines.values()) <= MAX_FILE, lines
    tests = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "tests").glob("*.py")}
    assert max(tests.values()) <= MAX_TEST_FILE, tests


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
            block = tuple(text for _, text in lines[k:k + REPEAT])
            where = f"{path.name}:{lines[k][0]}"
            if block in seen:
                repeats.append(f"{where} ~ {seen[block]}")
            seen.setdefault(block, where)
    assert not repeats, repeats
