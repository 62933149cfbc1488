"""The run configuration: one pydantic tree, YAML files composed left to right, dotted overrides.

This module imports neither torch, vllm nor ray (a test asserts it), so the CLI, the launcher and the
dashboard parse and validate a config in milliseconds before any heavy import.

    cfg = load_config(["a.yaml", "b.yaml"], ["loss.is_cap=3.0", "actors.num_actors=4"])

Every field carries a docstring (pydantic reads attribute docstrings into the field description);
unknown keys are rejected with their dotted path; a wrong type names the key and the bad value.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class UserError(Exception):
    """Bad user input (config, data, CLI, run directory): one clear message; the CLI exits with code 2."""


class ConfigError(UserError, ValueError):
    """Bad user configuration: the message names the key, file or line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


TINY_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
"""The shipped tiny model (Hugging Face format, loadable by transformers and vLLM): what an empty
`model.path` means. `archer-async build-tiny` rebuilds it (launch/tiny_build.py)."""


class ModelConfig(_Section):
    path: Optional[str] = None
    """Local Hugging Face model directory. None: the shipped tiny model (archer_async/assets/tiny)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the learner and the actors' engines (bf16 on GPU, float32 on CPU)."""
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    """Learner attention kernel. auto: flash-attn when installed and on GPU, SDPA otherwise."""

    def directory(self) -> Path:
        """The model directory this config names: `path`, or the shipped tiny model when it is empty."""
        return Path(self.path) if self.path else TINY_MODEL_DIR


class DataConfig(_Section):
    train_files: list[str] = []
    """verl-format training files (parquet, json, jsonl). Empty: the embedded tiny task data."""
    eval_files: list[str] = []
    """verl-format held-out files. Empty: the embedded tiny held-out split."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are skipped (counted in the actor log)."""
    shuffle: bool = True
    """Shuffle the prompt stream (seeded; each pass over the data reshuffles)."""
    seed: int = 0
    """Seed of the prompt order and of the embedded tiny data generator."""
    tiny_num_train: int = 2000
    """Embedded tiny data: number of training problems generated."""
    tiny_num_eval: int = 200
    """Embedded tiny data: number of held-out problems generated."""


class ActorsConfig(_Section):
    num_actors: int = 2
    """Number of rollout actors (one inference engine each)."""
    backend: Literal["vllm", "transformers"] = "vllm"
    """Inference backend. transformers exists only for machines where vLLM cannot run."""
    gpus_per_actor: float = 0.0
    """GPUs each actor requests from Ray (0 on CPU)."""
    cpus_per_actor: float = 1.0
    """CPUs each actor requests from Ray."""
    node_label: Optional[str] = None
    """Ray custom resource an actor's node must have (e.g. "actor_node"); None: anywhere."""
    samples_per_prompt: int = 8
    """n: responses sampled per prompt (one group)."""
    temperature: float = 1.0
    """Training sampling temperature T (also used to scale logits for entropy and log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling threshold for training rollouts."""
    max_response_length: int = 64
    """Maximum generated tokens per response."""
    eval_temperature: float = 0.8
    """Sampling temperature of held-out evaluation."""
    eval_top_p: float = 1.0
    """Nucleus threshold of held-out evaluation."""
    inflight_update: Literal["keep", "abort"] = "keep"
    """In-flight weight update: keep the KV cache and continue, or abort and re-submit the prefix."""
    gpu_memory_utilization: float = 0.2
    """vLLM memory fraction (CPU memory on CPU, where it must stay <= 0.3)."""
    max_num_seqs: int = 64
    """vLLM maximum concurrent sequences per engine."""
    seed: int = 0
    """Base sampling seed; actor i uses seed + i."""
    max_inflight_prompts: int = 16
    """Prompts (groups) one actor generates concurrently, within what the buffer's admission grants."""
    enforce_eager: Optional[bool] = None
    """vLLM eager mode (no torch.compile). None: eager on CPU (start-up in seconds), compiled on GPU."""
    max_model_len: Optional[int] = None
    """vLLM context length (prompt + response). None: data.max_prompt_length + max_response_length."""
    kv_cache_gb: float = 1.0
    """CPU only: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE) when the environment does not set it."""
    admission_poll_s: float = 0.25
    """Pause between admission requests while the buffer grants no new prompt (the actor waits, it never over-generates)."""


class BufferConfig(_Section):
    capacity: int = 256
    """Maximum groups held (not yet consumed). When full, producers wait; nothing is dropped."""
    max_staleness: int = 4
    """eta: a group may be trained at version v only if every token's version >= v - eta."""
    sampler: Literal["oldest", "uniform"] = "oldest"
    """Which ready groups a sample request returns: oldest-first or uniform at random."""
    max_reuse: int = 1
    """How many times one group may be delivered for training (1: each sample trained once)."""
    filter_groups: bool = True
    """Drop groups whose rewards are all equal (no signal) or that hold an infra-error reward before
    they reach the learner (recorded with the reason, counted). Needs samples_per_prompt >= 2."""
    fsync: bool = True
    """fsync each batch of appends (group commit). False only for benchmarks."""
    direct_io: bool = True
    """With fsync: write the log with O_DIRECT, past the page cache (each group commit padded to a 4 KiB
    boundary). Where the filesystem refuses it (e.g. tmpfs) the buffer warns and writes buffered."""
    segment_bytes: int = 64 * 1024 * 1024
    """Segment files are sealed and a new one started beyond this size."""
    host: str = "127.0.0.1"
    """Address the buffer's sockets bind to. Keep loopback unless actors run on other nodes."""
    port: int = 0
    """First port of the buffer's sockets; 0 picks free ports."""
    node_label: Optional[str] = None
    """Ray custom resource the buffer's node must have; None: anywhere."""
    admission_batch_groups: Optional[int] = None
    """Groups per training step in the admission rule (accepted + in flight) < (eta + v + 1) * this.
    None: learner.batch_groups (8 when the buffer is started with its own section only)."""
    sampler_seed: int = 0
    """Seed of the uniform sampler."""
    max_message_bytes: int = 256 * 1024 * 1024
    """Largest ZMQ message the buffer accepts; bigger ones are refused by the socket."""
    max_commit_batch: int = 512
    """Most ingest messages appended per group commit (one fsync per batch)."""
    verify_payload: bool = False
    """Decode every ingested group's msgpack and check it against the producer's header (ids,
    rewards). False (default): every put is authenticated (MAC over all its bytes), so the buffer only
    checks that the payload is a msgpack map starting with the header's group_id; the learner decodes
    and validates the groups it trains on. True costs ~0.5 ms per 229 KB group of server CPU."""


class LearnerConfig(_Section):
    num_ranks: int = 2
    """FSDP2 world size of the learner."""
    gpus_per_rank: float = 0.0
    """GPUs each learner rank requests (0 on CPU: gloo; 1 on GPU: NCCL)."""
    cpus_per_rank: float = 1.0
    """CPUs each learner rank requests from Ray (on CPU also the rank's torch thread count)."""
    node_label: Optional[str] = None
    """Ray custom resource the learner's nodes must have; None: anywhere."""
    batch_groups: int = 16
    """Groups (prompts) per training step."""
    mini_batch_groups: int = 16
    """Groups per optimizer step; batch_groups / mini_batch_groups optimizer steps per training step."""
    ppo_epochs: int = 1
    """Passes over each training step's batch."""
    micro_batch_size: int = 16
    """Responses per forward/backward on one rank (gradient accumulation keeps the loss invariant)."""
    lr: float = 5e-5
    """AdamW learning rate after warm-up."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; a step whose norm is not finite is skipped."""
    warmup_steps: int = 0
    """Linear warm-up optimizer steps, then constant."""
    total_steps: int = 80
    """Training steps of the run."""
    activation_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """FSDP gradient reduction dtype."""
    checkpoint_every: int = 10
    """Save a checkpoint every this many steps (and at the end)."""
    export_hf_every: int = 0
    """Export hf/step-N every this many steps; 0: only at the end."""
    deterministic: bool = False
    """torch deterministic algorithms (bitwise-reproducible resume on CPU)."""
    seed: int = 0
    """Learner seed."""


class LossConfig(_Section):
    """The objective of docs/algorithm.md; names and defaults are part of the contract."""

    entropy_quantile: float = 0.8
    """q: per-response entropy quantile splitting high- (reasoning) from low-entropy (knowledge) tokens."""
    low_entropy_clip_ratio_low: float = 0.2
    """epsilon_low of the PPO clip on low-entropy tokens."""
    low_entropy_clip_ratio_high: float = 0.2
    """epsilon_high of the PPO clip on low-entropy tokens."""
    high_entropy_clip_ratio_low: float = 0.5
    """epsilon_low of the PPO clip on high-entropy tokens."""
    high_entropy_clip_ratio_high: float = 0.5
    """epsilon_high of the PPO clip on high-entropy tokens."""
    dual_clip_c: Optional[float] = 10.0
    """Dual-clip bound c for negative advantages; None disables."""
    kl_coef_low_entropy: float = 0.001
    """Coefficient of the k3 KL to the reference on low-entropy tokens."""
    kl_coef_high_entropy: float = 0.0
    """Coefficient of the k3 KL to the reference on high-entropy tokens."""
    loss_agg: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean"
    """Aggregation: mean over each response's tokens then over responses, or one mean over all tokens."""
    is_correction: Literal["token_tis", "token_mask", "none"] = "token_tis"
    """Off-policy correction weight per token from rho = pi_prox / mu."""
    is_cap: float = 2.0
    """Truncation cap of token_tis."""
    is_mask_low: float = 0.5
    """Lower bound of the token_mask band."""
    is_mask_high: float = 2.0
    """Upper bound of the token_mask band."""

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for every setting outside its meaningful range."""
        checks = [
            (0.0 <= self.entropy_quantile <= 1.0, "entropy_quantile", "must lie in [0, 1]"),
            (0.0 <= self.low_entropy_clip_ratio_low < 1.0, "low_entropy_clip_ratio_low", "must lie in [0, 1)"),
            (0.0 <= self.high_entropy_clip_ratio_low < 1.0, "high_entropy_clip_ratio_low", "must lie in [0, 1)"),
            (self.low_entropy_clip_ratio_high >= 0.0, "low_entropy_clip_ratio_high", "must be >= 0"),
            (self.high_entropy_clip_ratio_high >= 0.0, "high_entropy_clip_ratio_high", "must be >= 0"),
            (self.dual_clip_c is None or self.dual_clip_c > 1.0, "dual_clip_c", "must be > 1 or null"),
            (self.kl_coef_low_entropy >= 0.0, "kl_coef_low_entropy", "must be >= 0"),
            (self.kl_coef_high_entropy >= 0.0, "kl_coef_high_entropy", "must be >= 0"),
            (self.is_cap >= 1.0, "is_cap", "must be >= 1 (so on-policy tokens keep weight 1)"),
            (0.0 <= self.is_mask_low <= 1.0, "is_mask_low", "must lie in [0, 1]"),
            (self.is_mask_high >= 1.0, "is_mask_high", "must be >= 1"),
        ]
        return [(key, f"{getattr(self, key)!r}: {msg}") for ok, key, msg in checks if not ok]

    @model_validator(mode="after")
    def _check_ranges(self) -> "LossConfig":
        bad = self.problems()
        if bad:
            raise ValueError("; ".join(f"{k} = {m}" for k, m in bad))
        return self


class RewardsConfig(_Section):
    """Graders and their limits. The default limits are those of Archer's grader, the recipe this
    project reproduces (wizard-III/ArcherCodeR rewards/code_utils/utils.py: 30 s per stdin test, 60 s
    per functional run, `prlimit --as` 1 GiB, 16 sampled tests; LiveCodeBench rows: LiveCodeBench's
    own 6 s per test), so a slow but correct solution scores as it does there."""

    workers: int = 2
    """Reward worker threads: samples graded in parallel (each runs its own sandboxes and math verifier)."""
    sandbox: Literal["bwrap", "none"] = "bwrap"
    """bwrap: every program in a fresh bubblewrap sandbox. none: trusted data only (warns every run)."""
    timeout_s: float = 30.0
    """Wall-clock limit of one stdin/stdout test (and of one call of a TACO / PrimeIntellect call-based
    row); the sandbox is SIGKILLed past it. 30 s: Archer's code_exec timeout."""
    functional_timeout_s: float = 60.0
    """Wall-clock limit of one functional run (all of a problem's test code). 60 s: Archer's."""
    lcb_timeout_s: float = 6.0
    """Limit of one LiveCodeBench test (stdin or call), enforced test by test as LiveCodeBench's own
    evaluation does (its --timeout default, 6 s; Archer's copy of that grader allows 150 s)."""
    cpu_time_s: Optional[int] = None
    """RLIMIT_CPU of one program run; None: the run's wall-clock limit rounded up (only the wall clock binds)."""
    memory_mb: int = 1024
    """RLIMIT_AS of each process of a run, in MiB. 1024: Archer's `prlimit --as=1073741824`."""
    max_output_bytes: int = 1_000_000
    """Output kept per program run; more is a fail."""
    max_tests_per_problem: int = 16
    """Tests sampled per stdin or call-based problem in training (evaluation runs all; LiveCodeBench rows
    always run all). 16: Archer's max_test_case_num."""
    math_timeout_s: float = 20.0
    """Deadline of one math verification (the verifier process is killed past it: status timeout). Inside
    it Archer's own limits apply (5 s to parse, 5 s to verify); this bounds sympy, which has none."""
    max_processes: int = 32
    """RLIMIT_NPROC of one program run (processes and threads of one sandbox uid)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE of one program run."""
    workdir_mb: int = 64
    """Size of the sandbox's in-memory work dir (/tmp) and RLIMIT_FSIZE of one program run."""
    sandbox_packages: list[str] = ["numpy", "pandas"]
    """Installed packages (import names) visible read-only inside the sandbox, with what they require:
    Archer's and DeepCoder's preludes import numpy and pandas, TACO's and HumanEval+'s tests numpy."""


class SyncConfig(_Section):
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Weight-transfer backend: auto is NCCL when learner and actors have GPUs, gloo otherwise."""
    bucket_mb: int = 256
    """Weights are gathered and sent in buckets of at most this many MiB."""
    timeout_s: float = 120.0
    """Deadline of one weight update; past it the update is aborted and actors keep the old version."""
    host: str = "127.0.0.1"
    """Address of learner rank 0's transfer rendezvous (TCPStore); must be reachable from every actor node."""
    store_port: int = 0
    """TCPStore port of the transfer group; 0 picks a free one at launch."""
    staged: bool = True
    """Receive a whole update before loading it (a failed transfer leaves the old weights serving;
    costs one extra copy of the weights in the actor's host memory, never a second copy on its GPU).
    False loads bucket by bucket."""


class LaunchConfig(_Section):
    mode: Literal["async", "sync"] = "async"
    """async: actors generate while the learner trains. sync: generate a batch, train, sync, repeat."""
    ray_address: Optional[str] = None
    """Ray cluster to join ("auto" or host:port); None starts a local cluster."""
    num_cpus: Optional[int] = None
    """CPUs of the local Ray cluster (None: Ray detects)."""
    startup_timeout_s: float = 300.0
    """Deadline for every role to start and for collective set-up; the error names the role and node."""
    eval_every: int = 20
    """Held-out evaluation every this many steps (and at start and end); 0 disables."""
    eval_k: int = 4
    """Samples per held-out problem (avg@K, pass@K)."""
    eval_max_problems: int = 100
    """Held-out problems evaluated per evaluation."""


class DashboardConfig(_Section):
    enabled: bool = True
    """Serve the live dashboard while the run trains."""
    host: str = "127.0.0.1"
    """Dashboard bind address."""
    port: int = 8365
    """Dashboard port; 0 picks a free one."""


class WandbConfig(_Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode: offline writes under the run directory; online needs credentials."""
    project: str = "archer-async"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team or user)."""
    name: Optional[str] = None
    """wandb run name (default: the run directory's name)."""


def _default_run_dir() -> str:
    return "runs/" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


class Config(_Section):
    model: ModelConfig = ModelConfig()
    """The policy model."""
    data: DataConfig = DataConfig()
    """Prompt data."""
    actors: ActorsConfig = ActorsConfig()
    """Rollout actors."""
    buffer: BufferConfig = BufferConfig()
    """Replay buffer."""
    learner: LearnerConfig = LearnerConfig()
    """FSDP2 learner."""
    loss: LossConfig = LossConfig()
    """The objective (docs/algorithm.md)."""
    rewards: RewardsConfig = RewardsConfig()
    """Verifiable rewards and the sandbox."""
    sync: SyncConfig = SyncConfig()
    """Weight synchronisation learner -> actors."""
    launch: LaunchConfig = LaunchConfig()
    """Placement and run control."""
    dashboard: DashboardConfig = DashboardConfig()
    """Live throughput dashboard."""
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases logging."""
    run_dir: str = ""
    """Run directory (config.resolved.yaml, metrics.jsonl, checkpoints/, hf/, buffer/, logs/). Empty: runs/<date-time>."""

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if not self.run_dir:
            object.__setattr__(self, "run_dir", _default_run_dir())
        if self.learner.batch_groups % self.learner.mini_batch_groups:
            raise ValueError("learner.batch_groups must be a multiple of learner.mini_batch_groups")
        return self


# ----------------------------------------------------------------------------------------------
# Loading: YAML files left to right, then dotted overrides.

def deep_merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins. Lists and scalars are replaced, not merged."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    """Read one YAML config file; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (so 3, true, null, [1,2])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. loss.is_cap=3.0)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        cur[part] = {}
        cur = cur[part]
    cur[parts[-1]] = value
    return out


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: dotted key, what is wrong, the bad value."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<config>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            # section validators report "field = value: problem"; join it to the section's path
            lines.extend(f"{key}.{part}" if re.match(r"^\w+ = ", part) else f"{key}: {part}" for part in msg.split("; "))
        else:
            msg = e["msg"]
            if "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
                lines.append(f"{key}: {msg} (got {e['input']!r})")
            else:
                lines.append(f"{key}: {msg}")
    return "invalid config: " + "; ".join(lines)


def build_config(data: dict) -> Config:
    """Validate a merged dict into a Config; raise ConfigError with dotted keys on failure."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(files: list[str] | tuple = (), overrides: list[str] | tuple = ()) -> Config:
    """Compose YAML files left to right, then apply dotted key=value overrides, then validate."""
    merged: dict[str, Any] = {}
    for f in files:
        merged = deep_merge(merged, read_yaml(f))
    for o in overrides:
        merged = deep_merge(merged, parse_override(o))
    return build_config(merged)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what --dry-run prints and config.resolved.yaml holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def iter_fields(model: type[BaseModel] = Config, prefix: str = ""):
    """Yield (dotted key, FieldInfo) for every leaf and section field (used by docs and tests)."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key, field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from iter_fields(ann, key + ".")


def resume_config(run_dir: str | Path, overrides: list[str] | tuple = ()) -> Config:
    """The config of an existing run (its config.resolved.yaml) with overrides on top; run_dir is pinned."""
    rd = Path(run_dir)
    resolved = rd / "config.resolved.yaml"
    if not resolved.is_file():
        raise ConfigError(f"{rd}: not a run directory (no config.resolved.yaml)")
    merged = deep_merge(read_yaml(resolved), {})
    for o in overrides:
        if o.split("=", 1)[0].strip() == "run_dir":
            raise ConfigError("run_dir cannot be overridden on resume")
        merged = deep_merge(merged, parse_override(o))
    merged["run_dir"] = str(rd)
    return build_config(merged)
