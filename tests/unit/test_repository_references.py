"""Code, docs and examples cite only files that are in this repository.

A reader who follows a cited document must find it here: documents kept elsewhere (the team's own notes)
are not part of what users get.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CITED = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
SCANNED = (".py", ".md", ".yaml", ".yml", ".proto", ".toml", ".cfg")
OUTSIDE = ".." + "/shared"  # spelled apart so that this file does not cite it


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines() if line]


def test_every_cited_document_is_in_the_repository() -> None:
    files = tracked_files()
    names = {path.name for path in files}
    missing = []
    for path in files:
        if path.suffix not in SCANNED or not path.exists():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for cited in CITED.findall(line):
                candidates = (REPO / cited, path.parent / cited)
                if not any(c.exists() for c in candidates) and Path(cited).name not in names:
                    missing.append(f"{path.relative_to(REPO)}:{number}: {cited}")
    assert missing == []


def test_nothing_points_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in tracked_files()
        if path.suffix in SCANNED and path.exists()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE in line
    ]
    assert offenders == []
