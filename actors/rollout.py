"""The rollout actor: continuous generation -> scoring -> the replay buffer, with in-flight weight updates.

    actor = RolloutActor(cfg, actor_index=0, run_dir="runs/x", sync_init=init.for_rank(1).to_dict())
    actor.start()                          # background generation, within the buffer's admission
    actor.update_weights(3)                # blocks until version 3 serves (or raises WeightUpdateError)
    actor.evaluate(rows, k=4)              # held-out samples: list (per row) of k response texts
    actor.stats(); state = actor.data_state(); actor.stop()

Usable from a plain process or a Ray actor (all public methods are blocking and thread-safe; the
work runs on the actor's own asyncio loop in a background thread).

Flow of one prompt: admission (`BufferClient.reserve(free slots, wait_s=actors.admission_wait_s)`: the
buffer holds a refused request and answers when slots free, shared among the actors by fewest in
flight; zero granted -> ask again, never over-generate)
-> the next prompt of this actor's shard (`PromptStream`, rank = actor index) -> n independent
requests (one per sample, so abort-mode re-submission and timing are per sample) -> the reward pool
-> one `TrajectoryGroup` -> `BufferClient.put`, which keeps the group and re-sends it until the
buffer acknowledges it (also across a buffer restart). A prompt stays in `data_state()["pending"]`
until then, so a restored actor regenerates what it had not delivered.

Sample ids "<actor_id>-<seq>" and group ids "<actor_id>-g<seq>" draw on one counter whose
high-water mark is reserved in blocks in RUN_DIR/actors/<actor_id>.json (written atomically before
use), so ids never repeat across restarts of the actor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from actors.engine import SampleParams, WeightUpdateError
from archer_async.config import Config
from archer_async.fsio import atomic_write_json
from archer_async.roles import ActorRole
from archer_async.types import TrajectoryGroup, Sample

log = logging.getLogger(__name__)

_REPORT_EVERY_S = 5.0
_KEEP_METRIC_ROWS = 2048


class SeqAllocator:
    """Monotonic per-actor sequence numbers that survive restarts (blocks reserved on disk first)."""

    def __init__(self, path: str | os.PathLike, block: int = 1024):
        self.path = Path(path)
        self.block = block
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._next = int(json.loads(self.path.read_text())["seq_high_water"]) if self.path.exists() else 0
        self._limit = self._next
        self._lock = threading.Lock()

    def _reserve(self, limit: int) -> None:
        atomic_write_json(self.path, {"seq_high_water": limit})
        self._limit = limit

    def next(self) -> int:
        with self._lock:
            if self._next >= self._limit:
                self._reserve(self._next + self.block)
            self._next += 1
            return self._next - 1


class RolloutActor(ActorRole):
    """One actor: an inference engine plus the rollout loop (see the module docstring).

    Args:
        cfg: the run config (or its dict form).
        actor_index: 0..num_actors-1; the actor id is "actor<index>", the data shard is index/num_actors.
        run_dir: this node's run directory (the seq high-water mark, acknowledgements, actor metrics;
            the buffer's endpoints and secret when they are not given).
        buffer_endpoints: {"ingest": url, "control": url} (the launcher passes the buffer role's);
            None: read RUN_DIR/buffer/endpoints.json (the buffer on this node, same run directory).
        buffer_secret: the run secret for buffer_endpoints; None: read RUN_DIR/buffer/secret.
        sync_init: this actor's `archer_async.weight_sync.SyncInit` (dict form, rank set); None: no
            weight updates (evaluation-only engines).
        initial_version: weight version the loaded weights are (tokens are labelled with it).
        model_path: weights to load; None: cfg.model.path, else the embedded tiny model.
        buffer_client: an object with reserve(n) / put(group, timeout) / release(n) / close(), used
            instead of a BufferClient (tests).
        connect_buffer: False skips the buffer entirely (evaluation only; start() is refused).
    """

    def __init__(self, cfg: "Config | dict", actor_index: int, run_dir: str, buffer_endpoints: Optional[dict] = None,
                 sync_init: Optional[dict] = None, *, initial_version: int = 0, model_path: Optional[str] = None,
                 buffer_client: Any = None, connect_buffer: bool = True, buffer_secret: Optional[bytes] = None):
        self.cfg = cfg if isinstance(cfg, Config) else Config.model_validate(cfg)
        self.index = int(actor_index)
        self.actor_id = f"actor{self.index}"
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        a = self.cfg.actors
        self.model_path = str(model_path or self.cfg.model.path or self._tiny_path())
        self.seq = SeqAllocator(self.run_dir / "actors" / f"{self.actor_id}.json")
        self._buffer_endpoints = buffer_endpoints
        self._buffer_secret = buffer_secret
        self._buffer = buffer_client
        self._connect_buffer = connect_buffer
        self._sync_init = None if sync_init is None else dict(sync_init.to_dict() if hasattr(sync_init, "to_dict") else sync_init)

        from transformers import AutoTokenizer

        from archer_async.data import PromptStream, default_datasets

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.train_rows, _ = default_datasets(self.cfg.data)
        self.stream = PromptStream(self.train_rows, seed=self.cfg.data.seed, shuffle=self.cfg.data.shuffle,
                                   rank=self.index, world=max(1, a.num_actors))
        self._pending: deque[int] = deque()      # dataset indices to (re)generate first (restored state)
        self._inflight: dict[int, int] = {}      # group seq -> dataset index, until the buffer acknowledged it
        self._data_lock = threading.Lock()

        # counters (read by stats(); written on the loop thread)
        self.tokens_generated = 0
        self.groups_sent = 0
        self.prompts_skipped = 0
        self.wait_for_weights_s = 0.0
        self.idle_s = 0.0                        # waiting for admission with no prompt in flight
        self.samples_generated = 0               # samples of the groups the buffer acknowledged
        self._admit_wake = threading.Event()
        self._idle_t0: Optional[float] = None    # start of the current idle wait, if any
        self.updates: list[dict] = []
        self._recent: deque[tuple[float, int]] = deque()
        self._requests: dict[str, int] = {}      # request id -> version at submission
        self._started_at = time.monotonic()
        self.error: Optional[BaseException] = None
        self.acked_group_ids: deque[str] = deque(maxlen=100_000)  # acknowledged by the buffer (newest last)
        self._metric_rows: deque[dict] = deque(maxlen=_KEEP_METRIC_ROWS)  # newest actor metrics rows
        self._metric_rows_total = 0              # rows reported since this actor started
        self._tasks: set[asyncio.Task] = set()

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{self.actor_id}-loop", daemon=True)
        self._thread.start()
        self._buffer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.actor_id}-buffer")
        self._score_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix=f"{self.actor_id}-score")
        self._rewards = None
        self._main: Optional[concurrent.futures.Future] = None
        self._stopping = False
        self.engine = self._call(self._create_engine(initial_version))
        self.version = int(initial_version)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _tiny_path() -> str:
        from archer_async.config import TINY_MODEL_DIR

        return str(TINY_MODEL_DIR)

    def _call(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _create_engine(self, version: int):
        a = self.cfg.actors
        max_len = a.max_model_len or (self.cfg.data.max_prompt_length + a.max_response_length)
        from archer_async.modelinfo import context_length

        ctx = context_length(self.model_path)
        if ctx is not None and max_len > ctx:  # vLLM refuses a max_model_len over the model's own
            log.warning("%s: context length %d (prompt + response) exceeds the model's %d "
                        "(max_position_embeddings); using %d", self.actor_id, max_len, ctx, ctx)
            max_len = ctx
        args = dict(model_path=self.model_path, actors=a, sync=self.cfg.sync, seed=a.seed + self.index,
                    initial_version=version, max_model_len=max_len, dtype=self.cfg.model.dtype,
                    sync_init=self._sync_init)
        if a.backend == "transformers":
            from actors.hf_backend import HFBackend

            return await HFBackend.create(**args)
        from actors.engine import VLLMBackend

        return await VLLMBackend.create(**args)

    def _buffer_client(self):
        if self._buffer is None:
            from archer_async.buffer_client import BufferClient

            if self._buffer_endpoints is not None:
                from archer_async import wire

                # given endpoints are the buffer role's own (over Ray): no file of this node is read for them
                secret = self._buffer_secret if self._buffer_secret is not None else wire.load_secret(self.run_dir)
                self._buffer = BufferClient(self._buffer_endpoints, secret, client_id=self.actor_id)
            else:
                self._buffer = BufferClient.from_run_dir(self.run_dir, client_id=self.actor_id)
        return self._buffer

    async def _buf(self, fn):
        """Run a buffer-client call on the actor's single buffer thread (calls stay serialised)."""
        return await self._loop.run_in_executor(self._buffer_pool, fn)

    # ------------------------------------------------------------------ public API
    def start(self) -> None:
        """Begin continuous generation in the background (idempotent)."""
        if not self._connect_buffer:
            raise RuntimeError("this actor was created with connect_buffer=False (evaluation only)")
        if self._main is None:
            self._reward_pool()
            self._buffer_pool.submit(self._buffer_client).result()
            self._started_at = time.monotonic()
            self._main = asyncio.run_coroutine_threadsafe(self._produce(), self._loop)

    def update_weights(self, version: int, timeout_s: Optional[float] = None, mode: Optional[str] = None) -> dict:
        """Load weight `version` from the learner's sender (which must send it concurrently).

        Blocks until the new version serves. Returns {"version", "seconds", "paused_s", "mode"}.
        Raises WeightUpdateError past the deadline (sync.timeout_s) or on any failure; the actor then
        keeps generating with its previous weights and version. `mode`: "keep" | "abort"
        (default actors.inflight_update).
        """
        timeout = float(timeout_s or self.cfg.sync.timeout_s)
        mode = mode or self.cfg.actors.inflight_update
        if mode not in ("keep", "abort"):
            raise ValueError(f"in-flight update mode must be keep or abort, got {mode!r}")
        try:
            r = self._call(self.engine.update_weights(int(version), mode, timeout), timeout + 60.0)
        except WeightUpdateError:
            raise
        except Exception as e:
            raise WeightUpdateError(f"{self.actor_id}: update to version {version} failed: {e}") from e
        self.version = r["version"]
        self.wait_for_weights_s += r["paused_s"]
        self.updates.append(r)
        log.info("%s: now serving version %d (update %.2f s, paused %.2f s)", self.actor_id, self.version,
                 r["seconds"], r["paused_s"])
        return r

    def evaluate(self, rows: list[dict], k: int, temperature: Optional[float] = None, top_p: Optional[float] = None,
                 max_tokens: Optional[int] = None, seed: int = 0) -> list[list[str]]:
        """k sampled responses (texts) per row, with the current weights (eval temperature by default)."""
        a = self.cfg.actors
        p = SampleParams(max_tokens=max_tokens or a.max_response_length,
                         temperature=a.eval_temperature if temperature is None else temperature,
                         top_p=a.eval_top_p if top_p is None else top_p)
        return self._call(self._evaluate(rows, k, p, seed))

    def evaluate_rewards(self, rows: list[dict], k: int, **sampling) -> list[list[Optional[float]]]:
        """`evaluate`, then every response graded (all tests, training=False): per row, k rewards in
        {1.0, 0.0, None (infra error)}."""
        texts = self.evaluate(rows, k, **sampling)
        items = [(row["data_source"], row["reward_model"]["ground_truth"], t) for row, ts in zip(rows, texts) for t in ts]
        rewards = self._reward_pool().score(items, training=False)
        return [[r.value for r in rewards[i * k:(i + 1) * k]] for i in range(len(rows))]

    def _reward_pool(self):
        if self._rewards is None:
            from rewards import RewardPool

            self._rewards = RewardPool(self.cfg.rewards)
        return self._rewards

    def stats(self) -> dict:
        """Counters and rates: tokens/s (last 30 s), waits, in-flight requests, versions in use."""
        now = time.monotonic()
        window = [(t, n) for t, n in list(self._recent) if now - t <= 30.0]
        span = min(30.0, max(1e-6, now - self._started_at))
        versions: dict[str, int] = {}
        for v in list(self._requests.values()):
            versions[str(v)] = versions.get(str(v), 0) + 1
        return {
            "actor_id": self.actor_id, "version": self.version, "backend": self.cfg.actors.backend,
            "actor/tokens_per_s": sum(n for _, n in window) / span,
            "actor/wait_for_weights_s": self.wait_for_weights_s,  # total since start (the driver takes deltas)
            "idle_s": self.idle_total(), "samples_generated": self.samples_generated,
            "actor/in_flight": len(self._requests), "actor/versions": versions,
            "in_flight_prompts": len(self._inflight), "tokens_generated": self.tokens_generated,
            "groups_sent": self.groups_sent, "prompts_skipped": self.prompts_skipped,
            "updates": len(self.updates), "error": None if self.error is None else repr(self.error),
            "engine_dead": bool(getattr(self.engine, "dead", False)),
        }

    def metric_rows(self, since: int = 0) -> dict:
        """The actor metrics rows this actor reported (also in its node's RUN_DIR/actor_metrics.jsonl)
        from row `since` on, of the newest ones kept: {"next": the `since` of the next call, "rows"}."""
        rows, total = list(self._metric_rows), self._metric_rows_total
        first = total - len(rows)
        return {"next": total, "rows": rows[max(0, int(since) - first):]}

    def idle_total(self) -> float:
        """Seconds spent with no prompt in flight waiting for admission, the current wait included."""
        t0 = self._idle_t0
        return self.idle_s + (time.monotonic() - t0 if t0 is not None else 0.0)

    def data_state(self) -> dict:
        """Resumable data cursor: the prompt stream's position and the prompts taken but not yet
        acknowledged by the buffer (regenerated first after `load_data_state`)."""
        with self._data_lock:
            return {"stream": self.stream.state_dict(), "pending": list(self._pending) + list(self._inflight.values())}

    def load_data_state(self, state: dict) -> None:
        """Restore a `data_state()` (before start())."""
        if self._main is not None:
            raise RuntimeError("load_data_state must be called before start()")
        with self._data_lock:
            self.stream.load_state_dict(state["stream"])
            self._pending = deque(int(i) for i in state.get("pending", []))

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop generating, give back reservations, deliver what was already scored, shut the engine down."""
        if self._stopping:
            return
        self._stopping = True
        self._admit_wake.set()
        if self._main is not None:
            try:
                self._call(self._drain(timeout_s), timeout_s + 10)
            except Exception as e:
                log.warning("%s: stop: %s", self.actor_id, e)
        try:
            self._call(self.engine.close(), 60)
        finally:
            if self._rewards is not None:
                self._rewards.close()
            if self._buffer is not None:
                self._buffer_pool.submit(self._buffer.close).result(30)
            self._buffer_pool.shutdown(wait=False)
            self._score_pool.shutdown(wait=False)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # ------------------------------------------------------------------ the loop
    def _next_prompt(self) -> Optional[tuple[int, list[int]]]:
        from archer_async.data import prompt_ids

        with self._data_lock:
            idx = self._pending.popleft() if self._pending else next(self.stream)[0]
        ids = prompt_ids(self.tokenizer, self.train_rows[idx])
        if len(ids) > self.cfg.data.max_prompt_length:
            self.prompts_skipped += 1
            log.warning("%s: prompt %d has %d tokens > data.max_prompt_length; skipped", self.actor_id, idx, len(ids))
            return None
        return idx, ids

    async def _produce(self) -> None:
        a = self.cfg.actors
        client = self._buffer_client()
        tasks = self._tasks
        reporter = asyncio.create_task(self._report())
        try:
            while not self._stopping:
                if self.error is not None:
                    raise self.error
                if len(tasks) >= a.max_inflight_prompts:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                t0 = time.monotonic()
                idle = not tasks  # nothing in flight: the actor is idle while it waits for admission
                self._idle_t0 = t0 if idle else None
                want = a.max_inflight_prompts - len(tasks)
                self._admit_wake.clear()  # set by a finished rollout (its put must not wait) and by stop()
                try:
                    granted = await self._buf(lambda: client.reserve(
                        want, timeout=a.admission_wait_s + 30.0, wait_s=a.admission_wait_s, cancel=self._admit_wake))
                except Exception as e:  # buffer unreachable or restarting: wait, never generate unadmitted
                    log.warning("%s: admission request failed (%s: %s); retrying", self.actor_id, type(e).__name__, e)
                    granted = 0
                    await asyncio.sleep(a.admission_poll_s)
                self._idle_t0 = None
                if idle:  # nothing to do but wait for the learner to advance
                    self.idle_s += time.monotonic() - t0
                    self.wait_for_weights_s += time.monotonic() - t0
                if not granted:
                    continue
                for _ in range(granted):
                    item = self._next_prompt()
                    if item is None:
                        await self._buf(lambda: client.release(1))
                        continue
                    task = asyncio.create_task(self._rollout(*item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            reporter.cancel()

    async def _rollout(self, idx: int, prompt_ids: list[int]) -> None:
        a = self.cfg.actors
        row = self.train_rows[idx]
        gseq = self.seq.next()
        with self._data_lock:
            self._inflight[gseq] = idx
        try:
            seqs = [self.seq.next() for _ in range(a.samples_per_prompt)]
            ids = [f"{self.actor_id}-{s}" for s in seqs]
            params = [SampleParams(max_tokens=a.max_response_length, temperature=a.temperature, top_p=a.top_p,
                                   seed=(a.seed * 1_000_003 + s) % (2**31)) for s in seqs]
            comps = await asyncio.gather(*[self._sample(prompt_ids, p, rid) for p, rid in zip(params, ids)])
            texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in comps]
            gt = row["reward_model"]["ground_truth"]
            t0 = time.monotonic()
            rewards = await self._loop.run_in_executor(
                self._score_pool, lambda: self._rewards.score([(row["data_source"], gt, t) for t in texts], training=True))
            score_s = (time.monotonic() - t0) / max(1, len(texts))
            group = TrajectoryGroup(
                group_id=f"{self.actor_id}-g{gseq}", prompt_index=int(row.get("extra_info", {}).get("index", idx)),
                data_source=row["data_source"], prompt_ids=list(prompt_ids), actor_id=self.actor_id,
                samples=[Sample(sample_id=sid, response_ids=c.token_ids, behavior_logprobs=c.logprobs,
                                token_versions=c.versions, finish_reason=c.finish_reason, reward=r,
                                response_text=t, gen_seconds=c.seconds, score_seconds=score_s)
                         for sid, c, r, t in zip(ids, comps, rewards, texts)],
                created_at=time.time())
            client = self._buffer_client()
            self._admit_wake.set()  # a held admission request gives way to this put
            res = await self._buf(lambda: client.put(group, timeout=None))  # re-sent until acknowledged
            self._record_ack(group.group_id, getattr(res, "status", ""))
            self.groups_sent += 1
            self.samples_generated += len(group.samples)
            self.acked_group_ids.append(group.group_id)
            with self._data_lock:
                self._inflight.pop(gseq, None)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("%s: rollout of prompt %d failed", self.actor_id, idx)
            self.error = e

    def _record_ack(self, group_id: str, status: str) -> None:
        """Append the buffer's acknowledgement to RUN_DIR/actors/<actor_id>.acked.jsonl (the producer's
        side of exactly-once accounting: every group listed here must be in the buffer's log)."""
        try:
            with open(self.run_dir / "actors" / f"{self.actor_id}.acked.jsonl", "a") as f:
                f.write(json.dumps({"group_id": group_id, "status": status}) + "\n")
        except OSError as e:  # bookkeeping must never stop generation
            log.warning("%s: ack record: %s", self.actor_id, e)

    async def _sample(self, prompt_ids: list[int], p: SampleParams, rid: str):
        self._requests[rid] = self.engine.version
        try:
            c = await self.engine.sample(prompt_ids, p, rid)
        finally:
            self._requests.pop(rid, None)
        self.tokens_generated += len(c.token_ids)
        self._recent.append((time.monotonic(), len(c.token_ids)))
        while self._recent and time.monotonic() - self._recent[0][0] > 60.0:
            self._recent.popleft()
        return c

    async def _evaluate(self, rows: list[dict], k: int, p: SampleParams, seed: int) -> list[list[str]]:
        from archer_async.data import prompt_ids

        async def one(i: int, row: dict, j: int) -> str:
            import dataclasses

            q = dataclasses.replace(p, seed=(seed * 1_000_003 + i * 1009 + j) % (2**31))
            c = await self.engine.sample(prompt_ids(self.tokenizer, row), q, f"{self.actor_id}-eval-{time.time_ns()}-{i}-{j}")
            return self.tokenizer.decode(c.token_ids, skip_special_tokens=True)

        flat = await asyncio.gather(*[one(i, r, j) for i, r in enumerate(rows) for j in range(k)])
        return [flat[i * k:(i + 1) * k] for i in range(len(rows))]

    async def _report(self) -> None:
        from archer_async.metrics import ActorMetricsWriter

        writer = ActorMetricsWriter(self.run_dir, self.actor_id)
        last_wait, last_idle, last_t = self.wait_for_weights_s, self.idle_total(), time.monotonic()
        while True:
            await asyncio.sleep(_REPORT_EVERY_S)
            s = self.stats()
            now, idle = time.monotonic(), s["idle_s"]
            try:
                row = writer.log(tokens_per_s=s["actor/tokens_per_s"], wait_for_weights_s=self.wait_for_weights_s - last_wait,
                                 in_flight=s["actor/in_flight"], versions=s["actor/versions"], version=self.version,
                                 idle_frac=min(1.0, max(0.0, (idle - last_idle) / max(1e-6, now - last_t))),
                                 samples_generated_total=s["samples_generated"])
                self._metric_rows.append(row)
                self._metric_rows_total += 1
            except Exception as e:  # metrics must never stop generation
                log.warning("%s: actor metrics: %s", self.actor_id, e)
            last_wait, last_idle, last_t = self.wait_for_weights_s, idle, now

    async def _drain(self, timeout_s: float) -> None:
        """Cancel generation in flight (those prompts stay pending) and return unused reservations."""
        if self._main is not None:
            await asyncio.sleep(0)
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        client = self._buffer
        if client is not None and getattr(client, "reserved", 0):
            try:
                await self._buf(lambda: client.release(client.reserved))
            except Exception as e:
                log.warning("%s: releasing reservations: %s", self.actor_id, e)
