"""The documentation: README stays short and leads with commands, every relative link of README, CHANGELOG and
docs/ resolves (files and #anchors), and CI runs the test command README gives."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
INSTALL = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install "setuptools<81" wheel && '
    "pip install --no-build-isolation -r requirements.txt"
)


def prose(text):
    """Markdown without its code: links inside code blocks and spans are examples, not links."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def anchors(page):
    """The #anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered."""
    seen, found = {}, set()
    for title in re.findall(r"^#{1,6} +(.+?) *#*$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_every_relative_link_resolves():
    broken, checked = [], 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            if not dest.exists() or (anchor and (dest.suffix != ".md" or anchor not in anchors(dest))):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert checked > 100 and not broken, broken


def test_readme_is_short_and_leads_with_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    assert any(line.startswith("```bash") for line in lines[:40])


def test_readmes_set_up_commands_are_whole_and_ci_runs_its_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    demo = re.search(rf"^{re.escape(INSTALL)} && python datasets.py demo && python train.py .+$", readme, re.M)
    tests = re.search(rf"^{re.escape(INSTALL)} && (python -m pytest .+)$", readme, re.M)
    assert demo and tests
    assert "pip install --no-build-isolation -r requirements.txt" in ci and f"\n{tests.group(1)}\n" in ci


def test_licence_and_changelog_exist():
    assert (
        "BSD 3-Clause" in (ROOT / "LICENSE").read_text() or "Redistribution and use" in (ROOT / "LICENSE").read_text()
    )
    assert "checkpoint" in (ROOT / "CHANGELOG.md").read_text()
