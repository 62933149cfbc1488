"""Package boundaries that must stay true.

- The core (`archer_async`) imports no role and holds only what two or more of the other packages
  use (the objective, `loss` and `advantages`, stays beside its specification: docs/algorithm.md).
- Each role package (actors, buffer, learner) imports the core and the rewards library only; the
  launcher imports the core and rewards, and reaches a role only through the role contract
  (`archer_async.roles`: module-path strings), never by import, `importlib` or `__import__`.
- No import cycle between the project's modules.
- Every role class implements its protocol in the contract with the same parameters.
- config, types and the CLI import neither torch, vllm, ray nor transformers.
"""

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("archer_async", "actors", "buffer", "learner", "launch", "rewards")
ROLES = ("actors", "buffer", "learner")
ALLOWED = {  # package -> the project packages it may import
    "archer_async": {"archer_async"},
    "rewards": {"archer_async", "rewards"},
    "actors": {"archer_async", "rewards", "actors"},
    "buffer": {"archer_async", "buffer"},
    "learner": {"archer_async", "learner"},
    "launch": {"archer_async", "rewards", "launch"},
}
OBJECTIVE = {"archer_async.loss", "archer_async.advantages"}
"""Core modules one role uses: the training objective, kept in the core as the project's contract."""
CONTRACT = "archer_async.roles"
"""The one module that names role modules by string."""
_MODULE_PATH = re.compile(r"^(actors|buffer|learner|launch|rewards)(\.[a-z_0-9]+)+(:[A-Za-z_]+)?$")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(f): f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every module name `path` imports: import statements (absolute and relative), importlib.import_module
    and __import__ of a string literal."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: None if path.name == "__init__.py" else -1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.add(node.args[0].value)
    return out


def _string_module_paths(path: Path, modules=None) -> list[str]:
    """String literals that name a project module by path ("pkg.module" or "pkg.module:Name"; with
    `modules`, only those naming one of them: a config key such as "actors.num_actors" is no module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and _MODULE_PATH.match(n.value)]
    return [t for t in found if modules is None or t.split(":")[0] in modules]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: {m for m in _imports(n, f) if m in mods} for n, f in mods.items()}


def test_each_package_imports_only_what_it_may():
    violations = []
    for name, path in _modules().items():
        pkg = name.split(".")[0]
        bad = {m.split(".")[0] for m in _imports(name, path)} & set(PACKAGES) - ALLOWED[pkg]
        if bad:
            violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert violations == []


def test_only_the_role_contract_names_role_modules_by_string():
    roles_by_string = []
    modules = _modules()
    for name, path in modules.items():
        pkg = name.split(".")[0]
        for target in _string_module_paths(path, modules):
            top = target.split(".")[0]
            if top in ALLOWED[pkg] or name == CONTRACT:
                continue
            roles_by_string.append(f"{path.relative_to(ROOT)}: {target!r}")
    assert roles_by_string == []


def test_no_import_cycle():
    # a package's __init__ re-exporting its own submodules is not a cycle between modules
    graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in _graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m] if m in stack else [n, m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert cycles == []


def test_core_holds_only_what_two_packages_share():
    graph = _graph()
    users: dict[str, set[str]] = {n: set() for n in graph if n.startswith("archer_async.")}
    for n, deps in graph.items():
        top = n.split(".")[0]
        if top == "archer_async":
            continue
        seen, stack = set(), [d for d in deps if d.startswith("archer_async.")]
        while stack:
            d = stack.pop()
            if d not in seen:
                seen.add(d)
                stack += [x for x in graph[d] if x.startswith("archer_async.")]
        for d in seen:
            users[d].add(top)
    lonely = {m: sorted(u) for m, u in users.items() if len(u) < 2 and m not in OBJECTIVE}
    assert lonely == {}, f"core modules used by fewer than two packages (move them to their user): {lonely}"


def test_role_classes_implement_their_protocols():
    from archer_async.roles import ROLES as SPECS, load

    problems = []
    for spec in SPECS:
        cls = load(spec.target)
        assert spec.protocol in cls.__mro__, f"{spec.target} does not declare {spec.protocol.__name__}"
        for method in sorted(spec.methods):
            impl = next((k.__dict__[method] for k in cls.__mro__ if method in k.__dict__ and k is not spec.protocol
                         and not getattr(k, "_is_protocol", False)), None)
            if impl is None:
                problems.append(f"{spec.target} does not implement {method}")
                continue
            want = list(inspect.signature(getattr(spec.protocol, method)).parameters)
            got = list(inspect.signature(impl).parameters)
            if want != got:
                problems.append(f"{spec.target}.{method}{got} differs from the protocol's {want}")
    assert problems == []


def test_the_checks_catch_violations(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import learner.trainer\nfrom buffer import server\nfrom . import sibling\n"
                 "import importlib\nimportlib.import_module('actors.rollout')\n__import__('launch.train')\n"
                 "TARGET = 'actors.rollout:RolloutActor'\n")
    got = _imports("pkg.x", f)
    assert {"learner.trainer", "buffer", "buffer.server", "pkg.sibling", "actors.rollout", "launch.train"} <= got
    assert set(_string_module_paths(f)) == {"actors.rollout", "launch.train", "actors.rollout:RolloutActor"}


def test_config_types_and_cli_stay_light():
    code = (
        "import sys, archer_async.config, archer_async.types, archer_async.roles, launch.cli;"
        "print(sorted(m for m in ('torch', 'vllm', 'ray', 'transformers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
