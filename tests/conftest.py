"""Shared fixtures of the test suite, and its tiers.

Tiers are folders: tests/unit (CPU, seconds, no servers), tests/integration (real processes and
sockets on 127.0.0.1), tests/e2e (the whole system on the tiny model). Tests under integration/ and
e2e/ are marked with their tier automatically, so `-m "not e2e"` and `-m integration` select by folder.
Helpers that are not fixtures live in tests/helpers/ (imported as `tests.helpers.<name>`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import pytest

TIERS = ("integration", "e2e")


def pytest_collection_modifyitems(items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """A random-init small Qwen2 (head_dim 64, tied embeddings, a word-level tokenizer) in Hugging Face
    format, built once per session (tests.helpers.learner.make_model_dir)."""
    from tests.helpers.learner import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("small-model") / "model")


@pytest.fixture
def cli(tmp_path) -> Callable[..., tuple[int, "object", dict]]:
    """Run the `archer-async` CLI as a user does, in a subprocess tagged for this test:
    `rc, run, left = cli(args, name, timeout_s=240, env=None)`. `run` is the finished CliRun (its
    `lines` and `output()`), `left` the processes of the run still alive 20 s after it exited
    (orphans). Everything tagged is killed when the test ends."""
    from tests.helpers.launch import CliRun, kill_tagged, new_tag, run_env, wait_no_tagged

    tags: list[str] = []

    def run(args: list[str], name: str, timeout_s: float = 240, env: Optional[dict] = None):
        tag = new_tag(name)
        tags.append(tag)
        proc = CliRun(args, tag, tmp_path / f"{name}.out", env=run_env(tag, **(env or {})))
        rc = proc.wait(timeout_s)
        return rc, proc, wait_no_tagged(tag, 20)

    yield run
    for tag in tags:
        kill_tagged(tag)


@pytest.fixture
def buffer_server(tmp_path):
    """Start `python -m buffer` processes on tmp_path (`buffer_server(cfg=None, restore=None, **kw)`
    returns the Popen, kw go to tests.helpers.buffer.start_server); all are stopped when the test ends."""
    from tests.helpers.buffer import start_server

    procs = []

    def start(cfg: Optional[dict] = None, restore: Optional[dict] = None, **kw):
        p = start_server(tmp_path, cfg or {"capacity": 64}, restore, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(10)
