"""The transformers backend: same interface as `actors.engine.VLLMBackend`, for machines where vLLM
cannot run (never the default where it does: `actors.backend = "transformers"` selects it).

A worker thread batches the pending requests (up to `max_num_seqs`) and samples them step by step
with a KV cache (left padding, explicit position ids). Behaviour log-probs are computed exactly as
vLLM's processed log-probs: fp32 logits / T, top-p mask, log_softmax. Weight updates arrive through
`actors.weight_receiver.WeightReceiver` (staged, then copied into the parameters between two
decoding steps), so responses in flight span versions exactly as with vLLM's keep mode; abort mode
is treated as keep (there is no KV cache to recompute that keep would not already handle).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Optional

import torch

from actors.engine import Completion, SampleParams, WeightUpdateError
from archer_async.config import ActorsConfig, SyncConfig

log = logging.getLogger(__name__)


class _Req:
    def __init__(self, prompt_ids: list[int], p: SampleParams, fut: asyncio.Future, loop):
        self.prompt_ids, self.p, self.fut, self.loop = prompt_ids, p, fut, loop
        self.t0 = time.monotonic()


def _top_p_mask(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with tokens outside each row's nucleus set to -inf (top_p [B]; 1.0 keeps all)."""
    if bool((top_p >= 1.0).all()):
        return logits
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    cum = probs.cumsum(-1) - probs  # mass strictly before each token
    drop = cum > top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


class HFBackend:
    """transformers model in the actor process (CPU or one GPU)."""

    def __init__(self, model, tokenizer, actors: ActorsConfig, sync: SyncConfig, seed: int, version: int,
                 sync_init: Optional[dict]):
        self.model = model
        self.actors = actors
        self.sync = sync
        self.version = version
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        self.eos_ids = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.gen = torch.Generator(device=model.device).manual_seed(seed)
        self._q: "queue.Queue[_Req]" = queue.Queue()
        self._lock = threading.Lock()  # held during one decoding step and during a weight load
        self._stop = threading.Event()
        self._receiver = None
        self._sync_init = sync_init
        self.closing = False
        self._thread = threading.Thread(target=self._loop, name="hf-generate", daemon=True)
        self._thread.start()
        self._connected = threading.Event()
        if sync_init is not None:  # join the transfer group in the background, as the vLLM engine does
            threading.Thread(target=self._connect, name="hf-weights-connect", daemon=True).start()

    def _connect(self) -> None:
        from actors.weight_receiver import WeightReceiver

        try:
            rx = WeightReceiver(self._sync_init, device=self.model.device)
            rx.connect()
            self._receiver = rx
        except Exception as e:
            log.error("transformers backend: could not join the weight-transfer group: %s", e)
        finally:
            self._connected.set()

    @classmethod
    async def create(cls, model_path: str, actors: ActorsConfig, sync: SyncConfig, seed: int, initial_version: int,
                     max_model_len: int, dtype: str = "float32", sync_init: Optional[dict] = None) -> "HFBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        def load():
            device = "cuda" if torch.cuda.is_available() else "cpu"
            m = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
            return m, AutoTokenizer.from_pretrained(model_path)

        model, tok = await asyncio.get_running_loop().run_in_executor(None, load)
        return cls(model, tok, actors, sync, seed, initial_version, sync_init)

    # ------------------------------------------------------------------ generation
    async def sample(self, prompt_ids: list[int], p: SampleParams, request_id: str) -> Completion:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put(_Req(list(prompt_ids), p, fut, loop))
        return await fut

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.actors.max_num_seqs:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self._generate(batch)
                for r, c in zip(batch, results):
                    r.loop.call_soon_threadsafe(_set_result, r.fut, c)
            except Exception as e:  # every waiting request learns about it
                log.exception("transformers generation failed")
                for r in batch:
                    r.loop.call_soon_threadsafe(_set_exception, r.fut, e)

    @torch.no_grad()
    def _generate(self, batch: list[_Req]) -> list[Completion]:
        dev = self.model.device
        B = len(batch)
        P = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((B, P), dtype=torch.long, device=dev)
        for i, r in enumerate(batch):
            ids[i, P - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, device=dev)
            mask[i, P - len(r.prompt_ids):] = 1
        temp = torch.tensor([max(r.p.temperature, 1e-5) for r in batch], device=dev)
        top_p = torch.tensor([r.p.top_p for r in batch], device=dev)
        max_new = torch.tensor([r.p.max_tokens for r in batch], device=dev)
        stops = [set(r.p.stop_token_ids or ()) | self.eos_ids for r in batch]
        toks: list[list[int]] = [[] for _ in batch]
        lps: list[list[float]] = [[] for _ in batch]
        vers: list[list[int]] = [[] for _ in batch]
        finish: list[Optional[str]] = [None] * B
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        past = None
        inp = ids
        for step in range(int(max_new.max())):
            with self._lock:
                out = self.model(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=past,
                                 use_cache=True)
                version = self.version
            past = out.past_key_values
            logits = _top_p_mask(out.logits[:, -1].float() / temp[:, None], top_p)
            logp = logits.log_softmax(-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=self.gen)[:, 0]
            chosen = logp.gather(-1, nxt[:, None])[:, 0]
            for i in range(B):
                if finish[i] is not None:
                    continue
                t = int(nxt[i])
                toks[i].append(t)
                lps[i].append(float(chosen[i]))
                vers[i].append(version)
                if t in stops[i]:
                    finish[i] = "stop"
                elif len(toks[i]) >= batch[i].p.max_tokens:
                    finish[i] = "length"
            if all(f is not None for f in finish):
                break
            inp = nxt[:, None]
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
            pos = pos[:, -1:] + 1
        now = time.monotonic()
        return [Completion(toks[i], lps[i], vers[i], finish[i] or "length", seconds=now - batch[i].t0)
                for i in range(B)]

    # ------------------------------------------------------------------ weights
    async def update_weights(self, version: int, mode: str, timeout_s: float) -> dict:
        """Receive `version` (staged), then copy it into the parameters between two decoding steps."""
        if self._sync_init is None:
            raise WeightUpdateError("this actor was started without a weight-transfer group (sync_init)")
        t0 = time.monotonic()
        try:
            staged = await asyncio.get_running_loop().run_in_executor(None, self._receive, int(version), timeout_s)
        except Exception as e:
            log.error("WEIGHT UPDATE to version %s FAILED; still serving version %s: %s", version, self.version, e)
            raise WeightUpdateError(f"update to version {version} failed: {type(e).__name__}: {e}") from e
        params = dict(self.model.named_parameters())
        unknown = [n for n, _ in staged if n not in params]
        if unknown:
            raise WeightUpdateError(f"update to version {version}: unknown weights {unknown[:5]}")
        t1 = time.monotonic()
        with self._lock:
            with torch.no_grad():
                for n, t in staged:
                    params[n].copy_(t)
            self.version = int(version)
        t2 = time.monotonic()
        return {"version": self.version, "seconds": t2 - t0, "paused_s": t2 - t1, "mode": mode}

    def _receive(self, version: int, timeout_s: float) -> list:
        from actors.weight_receiver import WeightReceiver

        self._connected.wait(timeout_s)
        if self._receiver is None:
            self._receiver = WeightReceiver(self._sync_init, device=self.model.device)
            self._receiver.connect(timeout_s)
        gpu = self.model.device.type != "cpu"  # staged in host memory: no second copy of the model on the GPU
        return [(n, t) for n, t in self._receiver.receive(version, timeout_s=timeout_s, to_host=gpu)]

    async def weight_version(self) -> int:
        return self.version

    async def close(self) -> None:
        self.closing = True
        self._stop.set()
        self._thread.join(timeout=10)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
