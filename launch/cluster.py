"""Preflight checks and the Ray cluster's life: everything a run needs before and around its roles."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from archer_async.config import Config, UserError

log = logging.getLogger("launch")


@dataclass
class Preflight:
    """What the run checked before starting anything."""

    model_path: Path
    """The model directory every role loads."""
    num_train: int
    """Training prompts available."""
    num_eval: int
    """Held-out prompts available."""
    restore: dict = field(default_factory=dict)
    """On resume: the latest checkpoint's learner_state.json (step, version, extra_state)."""
    checkpoint: Optional[Path] = None
    """On resume: the checkpoint directory."""
    on_nodes: bool = False
    """On resume of a run on a joined cluster whose checkpoints are not in the driver's run directory:
    the checkpoint is read, and the buffer log checked, on the learner's and the buffer's nodes after
    placement (`resume_state_on_node`, `buffer_log_on_node`)."""


def preflight(cfg: Config, resume: bool) -> Preflight:
    """Model directory, data files, checkpoint: UserError naming the key or file, before any process starts."""
    from archer_async.data import default_datasets
    from archer_async.config import TINY_MODEL_DIR

    model = Path(cfg.model.path) if cfg.model.path else TINY_MODEL_DIR
    if not model.is_dir():
        raise UserError(f"model.path {str(model)!r}: directory not found")
    cfg_file = model / "config.json"
    try:
        json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise UserError(f"model.path {str(model)!r}: not a Hugging Face model directory (no config.json)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"model.path {str(model)!r}: config.json is unreadable ({e})") from None
    if not any((model / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"model.path {str(model)!r}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    if not list(model.glob("*.safetensors")) and not list(model.glob("*.bin")):
        raise UserError(f"model.path {str(model)!r}: no weights (*.safetensors or *.bin)")
    from archer_async.modelinfo import context_length

    ctx = context_length(model)
    if ctx is not None and cfg.data.max_prompt_length >= ctx:
        raise UserError(f"data.max_prompt_length {cfg.data.max_prompt_length} leaves no room to generate within "
                        f"the model's context length {ctx} (max_position_embeddings in {cfg_file})")
    from rewards import check_row

    train_rows, eval_rows = default_datasets(cfg.data, check=check_row)  # every row gradable, or DataError
    if not train_rows:
        raise UserError("data.train_files: no training rows")
    from launch.progress import check_can_progress

    check_can_progress(cfg, train_rows, eval_rows, model)  # configs and data that could never train a step
    pre = Preflight(model.resolve(), len(train_rows), len(eval_rows))
    if resume:
        rd = Path(cfg.run_dir)
        if cfg.launch.ray_address and not (rd / "checkpoints").exists() and not (rd / "buffer").exists():
            pre.on_nodes = True  # multi-node without a shared disk: read where the roles wrote them
            return pre
        pre.checkpoint, pre.restore = read_latest_checkpoint(rd)
        check_buffer_log(rd)
    return pre


def resume_state_on_node(run_dir: str) -> dict:
    """Learner rank 0's node, on resume: {"checkpoint", "state", "exported"} of its RUN_DIR's latest
    checkpoint (exported: its step's HF export is complete), or {"error": one line} (a UserError)."""
    try:
        step_dir, state = read_latest_checkpoint(Path(run_dir))
    except UserError as e:
        return {"error": str(e)}
    exported = (Path(run_dir) / "hf" / f"step-{state['step']}" / "config.json").is_file()
    return {"checkpoint": str(step_dir), "state": state, "exported": exported}


def buffer_log_on_node(run_dir: str) -> dict:
    """The buffer's node, on resume: {"has_log": RUN_DIR/buffer/log exists, "problem": why it cannot be
    replayed, "" when it can}."""
    has_log = (Path(run_dir) / "buffer" / "log").is_dir()
    try:
        check_buffer_log(Path(run_dir))
    except UserError as e:
        return {"has_log": has_log, "problem": str(e)}
    return {"has_log": has_log, "problem": ""}


def check_buffer_log(run_dir: Path, timeout_s: float = 300.0) -> None:
    """Read-only check of the run's buffer log by the buffer's own reader (`archer-async buffer inspect`,
    in a child process: the launcher does not import the buffer role). A corrupt sealed segment is a
    UserError naming it, before any process starts; a torn tail is fine (the buffer truncates it)."""
    if not (run_dir / "buffer" / "log").is_dir():
        return
    cmd = [sys.executable, "-m", "launch.cli", "buffer", "inspect", str(run_dir)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        msg = lines[-1].removeprefix("archer-async: ") if lines else f"exit code {r.returncode}"
        raise UserError(f"{run_dir / 'buffer' / 'log'}: the buffer log cannot be replayed: {msg}")


def read_latest_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """checkpoints/latest -> (step dir, its learner_state.json); UserError when missing or incomplete."""
    root = run_dir / "checkpoints"
    latest = root / "latest"
    if not latest.is_file():
        raise UserError(f"{run_dir}: no checkpoint to resume from ({latest} missing)")
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UserError(f"{latest}: corrupt (not UTF-8 text; it should name a step directory, e.g. step-10)") from None
    if not name or "/" in name or name in (".", ".."):
        raise UserError(f"{latest}: corrupt (names {name!r}, not a step directory of {root})")
    step_dir = root / name
    if not (step_dir / "DONE").is_file():
        raise UserError(f"{step_dir}: checkpoint is incomplete (no DONE marker)")
    state_file = step_dir / "learner_state.json"
    try:
        state = json.loads(state_file.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{state_file}: corrupt checkpoint state ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not (isinstance(state, dict) and all(type(state.get(k)) is int and state[k] >= 0 for k in ("step", "version"))):
        raise UserError(f"{state_file}: corrupt checkpoint state (expected an object with integer 'step' and "
                        f"'version', got {json.dumps(state)[:80]})")
    return step_dir, state


def eval_rows(cfg: Config) -> list[dict]:
    """Held-out rows used by in-run evaluation (the first launch.eval_max_problems)."""
    from archer_async.data import default_datasets

    _, rows = default_datasets(cfg.data)
    return rows[: cfg.launch.eval_max_problems]


def role_env() -> dict[str, str]:
    """Environment every role process gets (vLLM on CPU needs unbound OpenMP threads)."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
           "TOKENIZERS_PARALLELISM": "false"}
    for k in ("VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE", "WANDB_MODE", "OMP_NUM_THREADS"):
        if k in os.environ:
            env[k] = os.environ[k]
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def required_resources(cfg: Config) -> dict[str, float]:
    """Total CPUs, GPUs and node labels the run's roles declare."""
    need = {
        "CPU": cfg.actors.num_actors * cfg.actors.cpus_per_actor + cfg.learner.num_ranks * cfg.learner.cpus_per_rank + 0.1,
        "GPU": cfg.actors.num_actors * cfg.actors.gpus_per_actor + cfg.learner.num_ranks * cfg.learner.gpus_per_rank,
    }
    for label, n in ((cfg.actors.node_label, cfg.actors.num_actors), (cfg.learner.node_label, cfg.learner.num_ranks),
                     (cfg.buffer.node_label, 1)):
        if label:
            need[label] = need.get(label, 0.0) + 0.001 * n
    return need


class _RayAuthDefaultFilter(logging.Filter):
    """Drops Ray's notice that a new local cluster uses token authentication (Ray's secure default,
    nothing to act on) from the terminal; its warning that authentication is disabled still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


def start_ray(cfg: Config, pre: Preflight) -> None:
    """Join launch.ray_address or start a local cluster; fail (and leave nothing running) if the roles
    cannot fit the cluster's resources."""
    import ray

    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _RayAuthDefaultFilter) for f in auth_log.filters):
        auth_log.addFilter(_RayAuthDefaultFilter())
    need = required_resources(cfg)
    # The first failure of a collective call is reported in one line; the same error from the other
    # ranks would otherwise print each whole remote traceback at exit (they are in logs/<role>.log).
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if cfg.launch.ray_address:
        _probe_gcs(cfg.launch.ray_address)
        try:
            ray.init(address=cfg.launch.ray_address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            stop_ray()
            raise UserError(f"launch.ray_address {cfg.launch.ray_address!r}: cannot join the Ray cluster "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    else:
        # Roles mostly wait on each other: a local cluster advertises enough logical CPUs for all of them.
        num_cpus = cfg.launch.num_cpus or max(os.cpu_count() or 1, int(need["CPU"] + 0.999))
        ray.init(address="local", num_cpus=num_cpus, **kwargs)  # a new cluster, never a stray one on this host
    have = ray.cluster_resources()
    why = {"CPU": " (actors.num_actors x actors.cpus_per_actor + learner.num_ranks x learner.cpus_per_rank + 0.1 "
                  "for the buffer; launch.num_cpus sizes a local cluster)",
           "GPU": " (actors.num_actors x actors.gpus_per_actor + learner.num_ranks x learner.gpus_per_rank)"}
    short = [f"{k}: need {v:g}, cluster has {have.get(k, 0):g}{why.get(k, ' (a node label: no node offers it)')}"
             for k, v in need.items() if v > have.get(k, 0) + 1e-9]
    if short:
        ray.shutdown()
        raise UserError("the roles do not fit the cluster's resources (" + "; ".join(short) + ")")


def _probe_gcs(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an unreachable launch.ray_address (ray.init would retry for minutes)."""
    addr = address.split("://", 1)[-1]
    if addr == "auto" or ":" not in addr:
        return
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise UserError(f"launch.ray_address {address!r}: no Ray cluster answers there ({e})") from None


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def make_sync(cfg: Config, host: str, store_port: int, devices: dict[str, list[str]]):
    """The weight-transfer rendezvous (learner rank 0 + one receiver per actor). `devices`: the GPU
    identities of every transfer-group member (role -> ids, `RoleHost.gpu_ids`); sync.backend auto picks
    nccl only when each member has its own GPU, host memory (gloo) otherwise
    (`launch.colocation`); an explicit nccl on a shared GPU is a UserError."""
    from archer_async.weight_sync import make_sync_init
    from launch.colocation import ColocationError, choose_backend

    try:
        choice = choose_backend(cfg.sync.backend, devices)
    except ColocationError as e:
        raise UserError(str(e)) from None
    log.info("weight transfer: %s", choice.reason)
    return make_sync_init(cfg.actors.num_actors, backend=choice.backend, host=host, timeout_s=cfg.sync.timeout_s,
                          store_port=store_port)
