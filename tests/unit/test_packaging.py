"""The package metadata builds without warnings (setup must print nothing a user has to read past)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_metadata_builds_without_warnings(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    code = ("import setuptools.build_meta as b, sys; "
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    (tmp_path / "md").mkdir()
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "md")], cwd=src,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warn" not in (r.stdout + r.stderr).lower(), r.stdout[-3000:] + r.stderr[-3000:]
    meta = next((tmp_path / "md").glob("*.dist-info")) / "METADATA"
    assert "License-Expression: Apache-2.0" in meta.read_text()
