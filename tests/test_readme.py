"""The README's Architecture table names every module there is, and no module that is gone.

The rule: the table's first column names every `.py` file under `gptjax/`, `serving/` and `checkpoints/`, each
as a backticked path (`gptjax/engine.py`), except empty `__init__.py` files (package markers) and
`serving/proto/` (the .proto files, their generated modules and the script that regenerates them: one row for
the folder). Only the first column counts, so a description may mention other files.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
FOLDERS = ("gptjax", "serving", "checkpoints")
SKIPPED = ("serving/proto/",)


def table_modules(readme: str) -> set[str]:
    """The backticked `.py` paths in the first column of the table under `## Architecture`."""
    assert "\n## Architecture\n" in readme, "README.md has no '## Architecture' section"
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return {path for row in rows for path in re.findall(r"`([^`]+\.py)`", row.split("|")[1])}


def source_modules() -> set[str]:
    paths = (p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))
    return {p.relative_to(ROOT).as_posix() for p in paths
            if not (p.name == "__init__.py" and not p.read_text().strip())
            and not p.relative_to(ROOT).as_posix().startswith(SKIPPED)}


def test_architecture_table_names_every_module():
    named, existing = table_modules((ROOT / "README.md").read_text()), source_modules()
    missing, extra = sorted(existing - named), sorted(named - existing)
    assert not missing and not extra, (
        "README.md's Architecture table is out of date:\n"
        + (f"  modules missing from it (add a row each): {', '.join(missing)}\n" if missing else "")
        + (f"  rows for modules that don't exist (remove or rename them): {', '.join(extra)}\n" if extra else ""))
