"""Package boundaries: the import star (roles import only archer_async) and light config/types modules."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("actors", "buffer", "learner", "launch")


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_roles_import_only_archer_async():
    violations = []
    for role in ROLES:
        for f in sorted((ROOT / role).rglob("*.py")):
            bad = _imported_top_levels(f) & (set(ROLES) - {role})
            if bad:
                violations.append(f"{f.relative_to(ROOT)} imports {sorted(bad)}")
    for f in sorted((ROOT / "archer_async").rglob("*.py")):
        bad = _imported_top_levels(f) & set(ROLES)
        if bad:
            violations.append(f"{f.relative_to(ROOT)} imports role {sorted(bad)} (use a module path string)")
    assert violations == []


def test_star_check_catches_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import learner.trainer\nfrom buffer import server\nfrom . import sibling\n")
    assert _imported_top_levels(f) == {"learner", "buffer"}


def test_config_types_and_cli_stay_light():
    code = (
        "import sys, archer_async.config, archer_async.types, archer_async.cli;"
        "print(sorted(m for m in ('torch', 'vllm', 'ray', 'transformers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
