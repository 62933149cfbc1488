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
from typing import Annotated, Any, Literal, Optional, Union

import annotated_types as _at

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class UserError(Exception):
    """Bad user input (config, data, CLI, run directory): one clear message; the CLI exits with code 2."""


class ConfigError(UserError, ValueError):
    """Bad user configuration: the message names the key, file or line."""


_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?")
"""A host name or an IPv4 address (no scheme, no port)."""


def _is_ip(v: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(v)
        return True
    except ValueError:
        return False


class _Section(BaseModel):
    # allow_inf_nan=False: NaN and +-inf are refused for every float setting, naming the key.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


_BOUNDS = ((_at.Ge, "ge", ">=", lambda v, b: v >= b), (_at.Gt, "gt", ">", lambda v, b: v > b),
           (_at.Le, "le", "<=", lambda v, b: v <= b), (_at.Lt, "lt", "<", lambda v, b: v < b))


def range_problems(section: BaseModel) -> list[tuple[str, str]]:
    """(field, "value: must be OP bound") for every numeric field of `section` outside its Field bounds
    or not finite: the same bounds pydantic enforces at parse time, read from the fields themselves."""
    out = []
    for name, info in type(section).model_fields.items():
        v = getattr(section, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v != v or v in (float("inf"), float("-inf")):
            out.append((name, f"{v!r}: must be a finite number"))
            continue
        for meta in info.metadata:
            for cls, attr, op, ok in _BOUNDS:
                if isinstance(meta, cls) and not ok(v, getattr(meta, attr)):
                    out.append((name, f"{v!r}: must be {op} {getattr(meta, attr)}"))
    return out


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
    max_prompt_length: int = Field(256, ge=1)
    """Prompts longer than this many tokens are skipped (counted in the actor log)."""
    shuffle: bool = True
    """Shuffle the prompt stream (seeded; each pass over the data reshuffles)."""
    seed: int = Field(0, ge=0)
    """Seed of the prompt order and of the embedded tiny data generator."""
    tiny_num_train: int = Field(2000, ge=1)
    """Embedded tiny data: number of training problems generated."""
    tiny_num_eval: int = Field(200, ge=1)
    """Embedded tiny data: number of held-out problems generated."""


class ActorsConfig(_Section):
    num_actors: int = Field(2, ge=1)
    """Number of rollout actors (one inference engine each)."""
    backend: Literal["vllm", "transformers"] = "vllm"
    """Inference backend. transformers exists only for machines where vLLM cannot run."""
    gpus_per_actor: float = Field(0.0, ge=0)
    """GPUs each actor requests from Ray (0 on CPU)."""
    cpus_per_actor: float = Field(1.0, ge=0)
    """CPUs each actor requests from Ray."""
    node_label: Optional[str] = None
    """Ray custom resource an actor's node must have (e.g. "actor_node"); None: anywhere."""
    samples_per_prompt: int = Field(8, ge=1)
    """n: responses sampled per prompt (one group)."""
    temperature: float = Field(1.0, gt=0)
    """Training sampling temperature T (also used to scale logits for entropy and log-probs)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold for training rollouts."""
    max_response_length: int = Field(64, ge=1)
    """Maximum generated tokens per response."""
    eval_temperature: float = Field(0.8, ge=0)
    """Sampling temperature of held-out evaluation."""
    eval_top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus threshold of held-out evaluation."""
    inflight_update: Literal["keep", "abort"] = "keep"
    """In-flight weight update: keep the KV cache and continue, or abort and re-submit the prefix."""
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1)
    """vLLM memory fraction (CPU memory on CPU, where it must stay <= 0.3)."""
    max_num_seqs: int = Field(64, ge=1)
    """vLLM maximum concurrent sequences per engine."""
    seed: int = Field(0, ge=0)
    """Base sampling seed; actor i uses seed + i."""
    max_inflight_prompts: int = Field(16, ge=1)
    """Prompts (groups) one actor generates concurrently, within what the buffer's admission grants."""
    enforce_eager: Optional[bool] = None
    """vLLM eager mode (no torch.compile). None: eager on CPU (start-up in seconds), compiled on GPU."""
    max_model_len: Optional[int] = Field(None, ge=2)
    """vLLM context length (prompt + response). None: data.max_prompt_length + max_response_length."""
    kv_cache_gb: float = Field(1.0, gt=0)
    """CPU only: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE) when the environment does not set it."""
    admission_poll_s: float = Field(0.25, gt=0, le=60)
    """Pause before asking again after an admission request failed (buffer unreachable or restarting)."""
    admission_wait_s: float = Field(5.0, gt=0)
    """How long the buffer may hold an actor's refused admission request: it answers as soon as slots
    free (divided among the waiting actors, fewest prompts in flight first), else after this long and
    the actor asks again. The actor waits, it never over-generates."""


class BufferConfig(_Section):
    capacity: int = Field(256, ge=1)
    """Maximum groups held (not yet consumed). When full, producers wait; nothing is dropped."""
    max_staleness: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = 4
    """eta: a group may be trained at version v only if every token's version >= v - eta. "auto": eta
    starts at auto_max_staleness and follows the learner's measured ESS and mismatch KL after every
    step (halved when they degrade, +1 when they are healthy, within [auto_min_staleness,
    auto_max_staleness]; archer_async/staleness.py), logged as staleness/bound."""
    auto_min_staleness: int = Field(1, ge=0)
    """Lower bound of eta under max_staleness auto."""
    auto_max_staleness: int = Field(8, ge=0)
    """Upper bound (and starting value) of eta under max_staleness auto."""
    auto_ess_low: float = Field(0.8, ge=0, le=1)
    """auto: a step with is/ess below this tightens eta (halves it)."""
    auto_ess_high: float = Field(0.95, ge=0, le=1)
    """auto: eta relaxes (+1) only after a step with is/ess at or above this..."""
    auto_kl_high: float = Field(0.02, gt=0)
    """auto: a step with is/mismatch_kl above this tightens eta; eta relaxes only at or below half of it."""
    sampler: Literal["fair", "oldest", "uniform"] = "fair"
    """Which ready groups a sample request returns. fair: oldest weight version first; among the
    groups of one version, in turn from the actors with the fewest groups trained so far, each actor's
    oldest first (no group goes stale while a newer one trains; keeps each actor's share of the
    trained samples near 1/N; the counts come from the buffer's log, so they survive restarts and
    resumes). oldest: oldest first by arrival. uniform: at random."""
    max_reuse: int = Field(1, ge=1)
    """How many times one group may be delivered for training (1: each sample trained once)."""
    filter_groups: bool = True
    """Drop groups whose rewards are all equal (no signal) or that hold an infra-error reward before
    they reach the learner (recorded with the reason, counted). Needs samples_per_prompt >= 2."""
    fsync: bool = True
    """fsync each batch of appends (group commit). False only for benchmarks."""
    direct_io: bool = True
    """With fsync: write the log with O_DIRECT, past the page cache (each group commit padded to a 4 KiB
    boundary). Where the filesystem refuses it (e.g. tmpfs) the buffer warns and writes buffered."""
    segment_bytes: int = Field(64 * 1024 * 1024, ge=1)
    """Segment files are sealed and a new one started beyond this size."""
    host: str = "auto"
    """Address the buffer's sockets bind to (and the one learners and actors connect to). auto: 127.0.0.1
    when every role of the run is on the buffer's node, else the buffer node's IP as Ray knows it (a
    standalone `python -m buffer`: 127.0.0.1). An IP address or host name binds there. Every message is
    authenticated with the run's secret whatever the address."""
    port: int = Field(0, ge=0, le=65535)
    """First port of the buffer's sockets; 0 picks free ports."""

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if v != "auto" and not (_HOST_RE.fullmatch(v or "") if ":" not in v else _is_ip(v)):
            raise ValueError(f"{v!r} is neither auto, an IP address nor a host name")
        return v
    node_label: Optional[str] = None
    """Ray custom resource the buffer's node must have; None: anywhere."""
    admission_batch_groups: Optional[int] = Field(None, ge=1)
    """Groups per training step in the admission rule (accepted + in flight) < (eta + v + 1) * this.
    None: learner.batch_groups (8 when the buffer is started with its own section only)."""
    sampler_seed: int = Field(0, ge=0)
    """Seed of the uniform sampler."""
    max_share_gap: Optional[int] = Field(8, ge=1)
    """Fair shares when admission does not bind: an actor is granted a prompt only while its groups
    accepted so far plus prompts in flight stay within this many of the live actor furthest behind,
    so an actor whose prompts the no-signal filter drops more often, or that generates more slowly,
    is not left behind in the trained samples (the others wait for it; an actor silent for 30 s no
    longer counts). None: only the staleness rule limits admission."""
    max_message_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    """Largest ZMQ message the buffer accepts; bigger ones are refused by the socket."""
    max_commit_batch: int = Field(512, ge=1)
    """Most ingest messages appended per group commit (one fsync per batch)."""
    verify_payload: bool = False
    """Decode every ingested group's msgpack and check it against the producer's header (ids,
    rewards). False (default): every put is authenticated (MAC over all its bytes), so the buffer only
    checks that the payload is a msgpack map starting with the header's group_id; the learner decodes
    and validates the groups it trains on. True costs ~0.5 ms per 229 KB group of server CPU."""


class LearnerConfig(_Section):
    num_ranks: int = Field(2, ge=1)
    """FSDP2 world size of the learner."""
    gpus_per_rank: float = Field(0.0, ge=0)
    """GPUs each learner rank requests (0 on CPU: gloo; 1 on GPU: NCCL)."""
    cpus_per_rank: float = Field(1.0, ge=0)
    """CPUs each learner rank requests from Ray (on CPU also the rank's torch thread count)."""
    node_label: Optional[str] = None
    """Ray custom resource the learner's nodes must have; None: anywhere."""
    batch_groups: int = Field(16, ge=1)
    """Groups (prompts) per training step."""
    mini_batch_groups: int = Field(16, ge=1)
    """Groups per optimizer step; batch_groups / mini_batch_groups optimizer steps per training step."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each training step's batch."""
    micro_batch_size: int = Field(16, ge=1)
    """Responses per forward/backward on one rank (gradient accumulation keeps the loss invariant); unused when
    max_tokens_per_micro_batch is set."""
    max_tokens_per_micro_batch: Optional[int] = Field(None, ge=2)
    """Token budget (prompt + response tokens) of one forward/backward on one rank. Set: each rank's share of a
    mini-batch is bin-packed longest first into micro-batches of at most this many tokens, and each micro-batch's
    rows run as one packed sequence with no padding (each row attends only to itself). Must be at least
    data.max_prompt_length + actors.max_response_length. None: micro_batch_size rows, right-padded."""
    lr: float = Field(5e-5, gt=0, le=1)
    """AdamW learning rate after warm-up."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip; a step whose norm is not finite is skipped."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up optimizer steps, then constant."""
    total_steps: int = Field(80, ge=1)
    """Training steps of the run."""
    activation_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """FSDP gradient reduction dtype."""
    checkpoint_every: int = Field(10, ge=1)
    """Save a checkpoint every this many steps (and at the end)."""
    export_hf_every: int = Field(0, ge=0)
    """Export hf/step-N every this many steps during the run; 0: only at the end (the last step is always exported)."""
    keep_checkpoints: int = Field(3, ge=0)
    """Keep the newest this many complete checkpoints (never the one `latest` names, never one being
    written); older ones are deleted after each save. 0: keep all."""
    keep_hf_exports: int = Field(2, ge=0)
    """Keep the newest this many HF exports (hf/step-N); older ones are deleted after each export.
    0: keep all."""
    deterministic: bool = False
    """torch deterministic algorithms (bitwise-reproducible resume on CPU)."""
    seed: int = Field(0, ge=0)
    """Learner seed."""


class LossConfig(_Section):
    """The objective of docs/algorithm.md; names and defaults are part of the contract."""

    entropy_quantile: float = Field(0.8, ge=0, le=1)
    """q: per-response entropy quantile splitting high- (reasoning) from low-entropy (knowledge) tokens."""
    low_entropy_clip_ratio_low: float = Field(0.2, ge=0, lt=1)
    """epsilon_low of the PPO clip on low-entropy tokens."""
    low_entropy_clip_ratio_high: float = Field(0.2, ge=0)
    """epsilon_high of the PPO clip on low-entropy tokens."""
    high_entropy_clip_ratio_low: float = Field(0.5, ge=0, lt=1)
    """epsilon_low of the PPO clip on high-entropy tokens."""
    high_entropy_clip_ratio_high: float = Field(0.5, ge=0)
    """epsilon_high of the PPO clip on high-entropy tokens."""
    dual_clip_c: Optional[float] = Field(10.0, gt=1)
    """Dual-clip bound c for negative advantages; None disables."""
    kl_coef_low_entropy: float = Field(0.001, ge=0)
    """Coefficient of the k3 KL to the reference on low-entropy tokens."""
    kl_coef_high_entropy: float = Field(0.0, ge=0)
    """Coefficient of the k3 KL to the reference on high-entropy tokens."""
    loss_agg: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean"
    """Aggregation: mean over each response's tokens then over responses, or one mean over all tokens."""
    is_correction: Literal["token_tis", "token_mask", "seq_tis", "geo_mask", "m2po", "none"] = "token_tis"
    """Off-policy correction weight per token from rho = pi_prox / mu: token_tis (min(rho, is_cap)),
    token_mask (rho inside [is_mask_low, is_mask_high], else 0), seq_tis (the response's product of rho,
    capped at seq_is_cap, on every token of the response), geo_mask (weight 1, a response whose geometric-
    mean rho lies outside [geo_mask_low, geo_mask_high] gets 0), m2po (rho, except the tokens with the
    largest (log rho)^2 get 0 until the mini-batch's mean (log rho)^2 is <= m2po_tau), none (1)."""
    is_cap: float = Field(2.0, ge=1)
    """Truncation cap of token_tis."""
    is_mask_low: float = Field(0.5, ge=0, le=1)
    """Lower bound of the token_mask band."""
    is_mask_high: float = Field(2.0, ge=1)
    """Upper bound of the token_mask band."""
    seq_is_cap: float = Field(2.0, ge=1)
    """Truncation cap of seq_tis (on the response's ratio exp(sum of log rho))."""
    geo_mask_low: float = Field(0.9, ge=0, le=1)
    """Lower bound of geo_mask on the response's geometric-mean ratio exp(mean of log rho)."""
    geo_mask_high: float = Field(1.1, ge=1)
    """Upper bound of geo_mask on the response's geometric-mean ratio."""
    m2po_tau: float = Field(0.04, gt=0)
    """m2po's bound on the mini-batch's mean (log rho)^2 over the tokens it keeps (M2PO's tau_M2)."""

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for every setting outside its Field bounds (for a config built without
        validation, e.g. `model_construct`; a validated one has none)."""
        return range_problems(self)


class RewardsConfig(_Section):
    """Graders and their limits. The default limits are those of Archer's grader, the recipe this
    project reproduces (wizard-III/ArcherCodeR rewards/code_utils/utils.py: 30 s per stdin test, 60 s
    per functional run, `prlimit --as` 1 GiB, 16 sampled tests; LiveCodeBench rows: LiveCodeBench's
    own 6 s per test), so a slow but correct solution scores as it does there."""

    workers: int = Field(2, ge=1)
    """Reward worker threads: samples graded in parallel (each runs its own sandboxes and math verifier)."""
    sandbox: Literal["bwrap", "none"] = "bwrap"
    """bwrap: every program in a fresh bubblewrap sandbox. none: trusted data only (warns every run)."""
    timeout_s: float = Field(30.0, gt=0)
    """Wall-clock limit of one stdin/stdout test (and of one call of a TACO / PrimeIntellect call-based
    row); the sandbox is SIGKILLed past it. 30 s: Archer's code_exec timeout."""
    functional_timeout_s: float = Field(60.0, gt=0)
    """Wall-clock limit of one functional run (all of a problem's test code). 60 s: Archer's."""
    lcb_timeout_s: float = Field(6.0, gt=0)
    """Limit of one LiveCodeBench test (stdin or call), enforced test by test as LiveCodeBench's own
    evaluation does (its --timeout default, 6 s; Archer's copy of that grader allows 150 s)."""
    cpu_time_s: Optional[int] = Field(None, ge=1)
    """RLIMIT_CPU of one program run; None: the run's wall-clock limit rounded up (only the wall clock binds)."""
    memory_mb: int = Field(1024, ge=16)
    """RLIMIT_AS of each process of a run, in MiB. 1024: Archer's `prlimit --as=1073741824`."""
    max_output_bytes: int = Field(1_000_000, ge=1)
    """Output kept per program run; more is a fail."""
    max_tests_per_problem: int = Field(16, ge=1)
    """Tests sampled per stdin or call-based problem in training (evaluation runs all; LiveCodeBench rows
    always run all). 16: Archer's max_test_case_num."""
    math_timeout_s: float = Field(20.0, gt=0)
    """Deadline of one math verification (the verifier process is killed past it: status timeout). Inside
    it Archer's own limits apply (5 s to parse, 5 s to verify); this bounds sympy, which has none."""
    max_processes: int = Field(32, ge=1)
    """RLIMIT_NPROC of one program run (processes and threads of one sandbox uid)."""
    max_open_files: int = Field(64, ge=4)
    """RLIMIT_NOFILE of one program run."""
    workdir_mb: int = Field(64, ge=1)
    """Size of the sandbox's in-memory work dir (/tmp) and RLIMIT_FSIZE of one program run."""
    sandbox_packages: list[str] = ["numpy", "pandas"]
    """Installed packages (import names) visible read-only inside the sandbox, with what they require:
    Archer's and DeepCoder's preludes import numpy and pandas, TACO's and HumanEval+'s tests numpy."""


class SyncConfig(_Section):
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Weight-transfer backend. auto: NCCL when learner rank 0 and every actor have GPUs of their own;
    host memory (gloo) when any of them has no GPU or two of them share one (decided from the GPUs' UUIDs
    after placement, e.g. single_gpu.yaml). nccl on a shared GPU is a configuration error."""
    bucket_mb: int = Field(256, ge=1)
    """Weights are gathered and sent in buckets of at most this many MiB."""
    timeout_s: float = Field(120.0, gt=0)
    """Deadline of one weight update; past it the update is aborted and actors keep the old version."""
    host: str = ""
    """Address learner rank 0's rendezvous stores listen on, and only there (the weight transfer's and
    the learner process group's torch TCPStores; they are not authenticated, keep them off untrusted
    networks); must be reachable from every learner and actor node. Empty: 127.0.0.1 when the run
    starts its own local Ray cluster, else learner rank 0's node IP."""
    store_port: int = Field(0, ge=0, le=65535)
    """TCPStore port of the transfer group on learner rank 0's node; 0 picks a free one at launch."""
    staged: bool = True
    """Receive a whole update before loading it (a failed transfer leaves the old weights serving;
    costs one extra copy of the weights in the actor's host memory, never a second copy on its GPU).
    False loads bucket by bucket."""


class LaunchConfig(_Section):
    mode: Literal["async", "sync"] = "async"
    """async: actors generate while the learner trains. sync: generate a batch, train, sync, repeat."""
    policy_lag: Optional[int] = Field(None, ge=0)
    """Sync mode only: train on data exactly k weight versions old (after the first k steps, which train
    on version-0 data): the learner at version v trains on groups generated by version v - k, and the
    actors generate one batch per version, held until it is complete. None or 0: plain sync (k = 0).
    Needs buffer.sampler oldest or fair (both take the oldest weight version first: the same batch),
    buffer.max_reuse 1 and (k + 1) * learner.batch_groups <= buffer.capacity."""
    ray_address: Optional[str] = None
    """Ray cluster to join ("auto" or host:port); None starts a local cluster."""
    num_cpus: Optional[int] = Field(None, ge=1)
    """CPUs of the local Ray cluster (None: Ray detects)."""
    startup_timeout_s: float = Field(300.0, gt=0)
    """Deadline for every role to start and for collective set-up; the error names the role and node."""
    no_progress_timeout_s: float = Field(600.0, ge=0)
    """No-progress watchdog: stop the run (naming the cause) when for this long no group reached the
    buffer while actors kept producing groups that were all filtered or stale, or prompts that were all
    skipped as too long. 0 disables."""
    eval_every: int = Field(20, ge=0)
    """Held-out evaluation every this many steps (and at start and end); 0 disables."""
    eval_k: int = Field(4, ge=1)
    """Samples per held-out problem (avg@K, pass@K)."""
    eval_max_problems: int = Field(100, ge=1)
    """Held-out problems evaluated per evaluation."""


class DashboardConfig(_Section):
    enabled: bool = True
    """Serve the live dashboard while the run trains."""
    host: str = "127.0.0.1"
    """Dashboard bind address."""
    port: int = Field(8365, ge=0, le=65535)
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
        b = self.buffer
        if not 0 <= b.auto_min_staleness <= b.auto_max_staleness:
            raise ValueError(f"buffer.auto_min_staleness = {b.auto_min_staleness}, auto_max_staleness = "
                             f"{b.auto_max_staleness}: need 0 <= min <= max")
        if not 0.0 <= b.auto_ess_low <= b.auto_ess_high <= 1.0:
            raise ValueError(f"buffer.auto_ess_low = {b.auto_ess_low}, auto_ess_high = {b.auto_ess_high}: "
                             "need 0 <= low <= high <= 1")
        k = self.launch.policy_lag
        if k is not None:
            if k < 0:
                raise ValueError(f"launch.policy_lag = {k}: must be >= 0")
            if self.launch.mode != "sync":
                raise ValueError("launch.policy_lag needs launch.mode: sync (an exact lag holds the actors)")
            if self.buffer.sampler not in ("oldest", "fair") or self.buffer.max_reuse != 1:
                raise ValueError("launch.policy_lag needs buffer.sampler: oldest or fair and buffer.max_reuse: 1 "
                                 f"(got {self.buffer.sampler!r}, {self.buffer.max_reuse})")
            if self.buffer.admission_batch_groups not in (None, self.learner.batch_groups):
                raise ValueError("launch.policy_lag needs buffer.admission_batch_groups unset or equal to "
                                 "learner.batch_groups")
            if (k + 1) * self.learner.batch_groups > self.buffer.capacity:
                raise ValueError(f"launch.policy_lag = {k}: (k + 1) * learner.batch_groups = "
                                 f"{(k + 1) * self.learner.batch_groups} groups must fit buffer.capacity = "
                                 f"{self.buffer.capacity}")
        budget = self.learner.max_tokens_per_micro_batch
        longest = self.data.max_prompt_length + self.actors.max_response_length
        if budget is not None and budget < longest:
            raise ValueError(f"learner.max_tokens_per_micro_batch = {budget}: must be at least "
                             f"data.max_prompt_length + actors.max_response_length = {longest} (the longest row)")
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
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
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
    except RecursionError:
        raise ConfigError(f"override {key!r}: value nested too deeply") from None
    out: dict = {}
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        cur[part] = {}
        cur = cur[part]
    cur[parts[-1]] = value
    return out


_RANGE_ERRORS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
                 "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}


_UNION_TAG = re.compile(r"^(constrained-)?(int|float|str|bool)$|^literal\[")


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: dotted key, what is wrong, the bad value. For a setting that takes a number
    or a word (`buffer.max_staleness: 4 | auto`) a number out of range reports only its range."""
    lines = []
    errors = [dict(e, loc=tuple(p for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))))
              for e in err.errors()]
    ranged = {e["loc"] for e in errors if e["type"] in _RANGE_ERRORS or e["type"] == "finite_number"}
    for e in errors:
        if e["type"] == "literal_error" and e["loc"] in ranged:
            continue
        key = ".".join(str(p) for p in e["loc"]) or "<config>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] in _RANGE_ERRORS:
            op, bound = _RANGE_ERRORS[e["type"]]
            lines.append(f"{key} = {e['input']!r}: must be {op} {e['ctx'][bound]}")
        elif e["type"] == "finite_number":
            lines.append(f"{key} = {e['input']!r}: must be a finite number")
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
