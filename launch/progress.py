"""Can this run make progress? Refused before start-up when the config says it cannot; stopped with the
cause when a live run stops making progress.

- `check_can_progress(cfg, train_rows, eval_rows, model_dir)` (preflight): configs under which no
  training step can ever be assembled, data the run cannot use, model files that cannot load.
- `ProgressWatch` (driver): fed the buffer's and the actors' counters while the learner waits for a
  training step; when for `launch.no_progress_timeout_s` no group reached the buffer while groups were
  filtered, dropped as stale, or prompts skipped as too long, it names that cause.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from archer_async.config import Config, UserError


def check_can_progress(cfg: Config, train_rows: list[dict], eval_rows: list[dict], model_dir: Path) -> None:
    """UserError (one line naming the keys or file) when this run could never train a step."""
    lc, bc, ac = cfg.learner, cfg.buffer, cfg.actors
    if lc.batch_groups > bc.capacity:
        raise UserError(f"learner.batch_groups={lc.batch_groups} > buffer.capacity={bc.capacity}: a training step "
                        "needs more groups than the buffer may hold, so no step could ever start; raise "
                        "buffer.capacity or lower learner.batch_groups")
    if bc.filter_groups and ac.samples_per_prompt < 2:
        raise UserError(f"actors.samples_per_prompt={ac.samples_per_prompt} with buffer.filter_groups=true: a group "
                        "of one response has all rewards equal and is always filtered as having no signal; set "
                        "actors.samples_per_prompt >= 2 (or buffer.filter_groups=false)")
    if len(train_rows) < ac.num_actors:
        raise UserError(f"data.train_files: {len(train_rows)} training row(s) for actors.num_actors={ac.num_actors}: "
                        "every actor needs at least one row of its own; add rows or lower actors.num_actors")
    if cfg.launch.eval_every and not eval_rows:
        raise UserError(f"data.eval_files {cfg.data.eval_files}: no held-out rows to evaluate; add rows or set "
                        "launch.eval_every=0")
    check_model_files(model_dir)
    check_prompt_lengths(cfg, train_rows, model_dir)


def check_model_files(model_dir: Path) -> None:
    """Every *.safetensors file is complete: its header parses and its tensors end at the file's end."""
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise UserError(f"{f}: truncated or not a safetensors file ({size} bytes; header needs {max(n, 0) + 8})")
            try:
                header = json.loads(fh.read(n).decode("utf-8"))
                end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
            except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
                raise UserError(f"{f}: corrupt safetensors header") from None
        if 8 + n + end != size:
            raise UserError(f"{f}: truncated safetensors file ({size} bytes, its header describes {8 + n + end}); "
                            "copy or export the model again")


def check_prompt_lengths(cfg: Config, train_rows: list[dict], model_dir: Path) -> None:
    """At least one training prompt fits data.max_prompt_length tokens (actors skip longer ones)."""
    from transformers import AutoTokenizer

    from archer_async.data import prompt_ids

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    limit = cfg.data.max_prompt_length
    shortest = None
    for row in train_rows:
        n = len(prompt_ids(tok, row))
        if n <= limit:
            return
        shortest = n if shortest is None else min(shortest, n)
    raise UserError(f"data.train_files: every one of the {len(train_rows)} training prompts is longer than "
                    f"data.max_prompt_length={limit} tokens (the shortest has {shortest}); every prompt would be "
                    "skipped; raise data.max_prompt_length")


@dataclass
class _Snapshot:
    t: float
    stored: int
    filtered: int
    stale: int
    skipped: int
    by_reason: dict


class ProgressWatch:
    """No-progress watchdog of a live run. `observe(t, buffer_stats, actor_stats)` every few seconds while
    the learner waits for data; it returns the cause once no group was stored for `timeout_s` although
    the actors kept producing (groups filtered or stale, prompts skipped), else "". Slow generation
    (nothing produced at all) is not a cause: other deadlines bound it."""

    def __init__(self, timeout_s: float, max_prompt_length: int, min_events: int = 1):
        self.timeout_s = timeout_s
        self.min_events = min_events
        self.max_prompt_length = max_prompt_length
        self._since: Optional[_Snapshot] = None

    def observe(self, t: float, buffer_stats: dict, actor_stats: list[dict]) -> str:
        if self.timeout_s <= 0:
            return ""
        now = _Snapshot(t, int(buffer_stats.get("stored_total", 0)), int(buffer_stats.get("dropped_filtered", 0)),
                        int(buffer_stats.get("dropped_stale", 0)),
                        sum(int(s.get("prompts_skipped", 0)) for s in actor_stats),
                        dict(buffer_stats.get("dropped_by_reason") or {}))
        first = self._since
        if first is None or now.stored != first.stored:
            self._since = now  # a group got in: progress; the window starts again
            return ""
        if now.t - first.t < self.timeout_s:
            return ""
        filtered, stale, skipped = now.filtered - first.filtered, now.stale - first.stale, now.skipped - first.skipped
        if filtered + stale + skipped < self.min_events:
            return ""  # too little produced to tell (slow generation is bounded by other deadlines)
        window = f"in the last {now.t - first.t:.0f} s"
        if filtered and not stale:
            reasons = {k: int(v) - int(first.by_reason.get(k, 0)) for k, v in now.by_reason.items()}
            detail = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()) if v > 0)
            return (f"no progress: every group filtered as having no signal ({filtered} groups {window}"
                    + (f": {detail}" if detail else "") + "); all rewards of each group are equal (check the data's "
                    "difficulty, actors.samples_per_prompt, the graders with `archer-async score`)")
        if stale:
            return (f"no progress: every group dropped as stale ({stale} stale, {filtered} filtered {window}); "
                    "raise buffer.max_staleness or lower learner.batch_groups")
        if skipped:
            return (f"no progress: every prompt skipped as longer than data.max_prompt_length={self.max_prompt_length} "
                    f"({skipped} prompts {window}); raise data.max_prompt_length")
        return ""
