"""The README a newcomer reads first, and the docs/ pages it sends them to: short, and no link that leads nowhere.

A reader who follows a link to a page or a section that moved lands on nothing, so every relative
link of README.md and docs/*.md must name a file that exists and, after `#`, one of its headings.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings (lower case, punctuation dropped, spaces as -)."""
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return found


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_the_first_five_minutes():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, "the README is a quickstart; the reference lives in docs/"
    # CI and the project's rules run the README's two commands as written
    assert "make demo   #" in readme and "make test   #" in readme and "make test-fast" in readme
    # every docs/ page is reachable from the README
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", readme))
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= linked
