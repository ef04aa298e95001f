"""Every test finds the real data sets through one helper (``tests/shared_data.py``), which reads
``ANIMALID_SHARED_DATA``; the README names the variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from shared_data import shared_data_dir, shared_manifest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def test_no_test_builds_its_own_path_to_the_shared_data() -> None:
    own_paths = re.compile(r"""["']shared["']\s*/\s*["']data["']|shared/data|ANIMALID_SHARED_DATA""")
    offenders = [
        str(path.relative_to(ROOT))
        for path in TESTS.rglob("*.py")
        if path.name not in ("shared_data.py", Path(__file__).name)
        and any(
            own_paths.search(line)
            for line in path.read_text().splitlines()
            if not line.lstrip().startswith("#")
        )
    ]
    assert offenders == []


def test_the_variable_points_the_helper_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "orl_faces").mkdir()
    (tmp_path / "orl_faces" / "manifest.csv").write_text("path,individual,species\n")
    monkeypatch.setenv("ANIMALID_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    assert shared_manifest("orl_faces") == tmp_path / "orl_faces" / "manifest.csv"
    with pytest.raises(pytest.skip.Exception, match="set ANIMALID_SHARED_DATA"):
        shared_manifest("dogfacenet")


def test_the_readme_names_the_variable() -> None:
    assert "`ANIMALID_SHARED_DATA`" in (ROOT / "README.md").read_text()
