"""verl-format prompt data: loading, validation and a resumable prompt stream.

A row (verl layout)::

    {"prompt": [{"role": "user", "content": "..."}], "data_source": "tiny_math",
     "reward_model": {"style": "rule", "ground_truth": "..."}, "extra_info": {"index": 0, ...}}

`load_rows` reads parquet (pyarrow), JSON (a list of rows) or JSONL and validates every row; a
malformed row raises `DataError` naming the file, the row (line number for JSONL, index for
JSON/parquet) and the field. `PromptStream` walks a dataset (or one actor's disjoint shard of it)
in a seeded order, epoch after epoch, and its `state_dict()` (epoch + position) resumes it exactly.
`prompt_ids` is the one rule that turns a row into the prompt tokens every model sees (actors,
evaluation and the tiny model's build use it). This module imports neither torch, vllm nor ray.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator

from archer_async.config import DataConfig, UserError


class DataError(UserError):
    """A data file is missing, unreadable or holds a malformed row (the message says where)."""


def _check_row(row: Any, where: str, check=None) -> dict:
    """Validate one row; return it with `extra_info` normalised to a dict. `where` names file and row;
    `check(row)` (the graders' own check, passed in by the launcher) raises ValueError naming the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: field 'prompt' must be a non-empty list of chat messages "
                        f"{{role, content}}, got {type(prompt).__name__ if prompt is not None else 'nothing'}")
    for j, msg in enumerate(prompt):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field 'prompt[{j}]' must be an object {{role, content}}, "
                            f"got {type(msg).__name__}")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                raise DataError(f"{where}: field 'prompt[{j}].{key}' must be a string, "
                                f"got {type(msg.get(key)).__name__ if key in msg else 'nothing'}")
    if not isinstance(row.get("data_source"), str) or not row["data_source"]:
        raise DataError(f"{where}: field 'data_source' must be a non-empty string")
    rm = row.get("reward_model")
    if not isinstance(rm, dict):
        raise DataError(f"{where}: field 'reward_model' must be an object with 'ground_truth'")
    if rm.get("ground_truth") is None:
        raise DataError(f"{where}: field 'reward_model.ground_truth' is missing")
    extra = row.get("extra_info")
    if extra is None:
        row = {**row, "extra_info": {}}
    elif not isinstance(extra, dict):
        raise DataError(f"{where}: field 'extra_info' must be an object, got {type(extra).__name__}")
    if check is not None:
        try:
            check(row)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
    return row


def _read_jsonl(p: Path, check=None) -> list[dict]:
    rows = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{lineno}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from None
            if not line.strip():
                continue
            obj = _parse_json(line, f"{p}:{lineno}")
            rows.append(_check_row(obj, f"{p}:{lineno}", check))
    return rows


def _parse_json(text: str, where: str) -> Any:
    """json.loads, with every way it can refuse (syntax, nesting depth, integers past Python's
    4,300-digit limit) as one DataError naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(f"{where}: invalid JSON: {str(e).split(';')[0]}") from None


def _read_json(p: Path, check=None) -> list[dict]:
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{p}: invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer past Python's 4,300-digit conversion limit
        raise DataError(f"{p}: invalid JSON: {str(e).split(';')[0]}") from None
    if not isinstance(data, list):
        raise DataError(f"{p}: a JSON data file must hold a list of rows, got {type(data).__name__}")
    return [_check_row(obj, f"{p}: row {i}", check) for i, obj in enumerate(data)]


def _read_parquet(p: Path, check=None) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{p}: not a readable parquet file: {e}") from None
    return [_check_row(obj, f"{p}: row {i}", check) for i, obj in enumerate(table.to_pylist())]


def load_rows(path: str | Path, check=None) -> list[dict]:
    """Rows of one verl-format file (.parquet, .json list, .jsonl), validated (and by `check`); raises DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p, check)
    if suffix == ".json":
        return _read_json(p, check)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(p, check)
    raise DataError(f"{p}: unknown data format {suffix or '(no suffix)'!r}; use .parquet, .json or .jsonl")


def load_dataset(files: list[str], check=None) -> list[dict]:
    """All rows of `files`, concatenated in order. A row's dataset index is its position here."""
    rows: list[dict] = []
    for f in files:
        rows.extend(load_rows(f, check))
    return rows


def default_datasets(cfg: DataConfig, check=None) -> tuple[list[dict], list[dict]]:
    """(train_rows, eval_rows): the configured files, or the embedded tiny generator where empty;
    `check(row)` validates each file row (ValueError -> DataError naming file, row and field)."""
    tiny = None
    if not cfg.train_files or not cfg.eval_files:
        from archer_async.taskgen import generate_tasks

        tiny = generate_tasks(cfg.tiny_num_train, cfg.tiny_num_eval, cfg.seed)
    train = load_dataset(cfg.train_files, check) if cfg.train_files else tiny[0]
    evals = load_dataset(cfg.eval_files, check) if cfg.eval_files else tiny[1]
    if not train:
        raise DataError(f"data.train_files {cfg.train_files}: no rows")
    return train, evals


def prompt_ids(tokenizer, row: dict) -> list[int]:
    """Token ids of a row's chat prompt with the assistant turn opened (the model's own chat template)."""
    text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


_SHARDING = "permuted"
"""How PromptStream cuts shards (recorded in its state: a checkpoint of another rule is refused)."""


class PromptStream:
    """Endless, seeded walk over a dataset shard, yielding (dataset index, row); resumable exactly.

    Shard `rank` of `world` owns every world-th row of a seeded permutation of the dataset indices
    (positions rank, rank + world, ...), so streams of different ranks never share a prompt and each
    shard holds a random sample of the data: a dataset whose rows alternate between kinds (math, code)
    does not give one kind to one actor, whose groups would then train at a different rate. Each epoch visits every owned row once, in a
    fresh seeded permutation when `shuffle` (identical for the same seed and epoch), else in order.
    `state_dict()` is {"epoch", "position", ...}: `load_state_dict` on a stream over the same rows
    continues with exactly the items the saved stream would have yielded next.
    """

    def __init__(self, rows: list[dict], seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"PromptStream: need 0 <= rank < world, got rank={rank} world={world}")
        self.rows = rows
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world
        perm = list(range(len(rows)))
        if world > 1:
            random.Random(f"prompt-shard-{seed}-{len(rows)}").shuffle(perm)
        self.indices = sorted(perm[rank::world])
        if not self.indices:
            raise DataError(f"PromptStream: shard {rank}/{world} of {len(rows)} rows is empty")
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(self.indices)
        if self.shuffle:
            random.Random(f"prompt-stream-{self.seed}-{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        return self

    def __next__(self) -> tuple[int, dict]:
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.position]
        self.position += 1
        return idx, self.rows[idx]

    def take(self, n: int) -> list[tuple[int, dict]]:
        """The next n items."""
        return [next(self) for _ in range(n)]

    def __len__(self) -> int:
        """Rows per epoch of this shard."""
        return len(self.indices)

    def state_dict(self) -> dict:
        """JSON-serialisable cursor: epoch, position in the epoch, and what the stream was built with."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "rank": self.rank, "world": self.world, "num_rows": len(self.rows), "sharding": _SHARDING}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor; the dataset size, seed, shuffle and shard must match."""
        if self.world > 1 and state.get("sharding", "modulo") != _SHARDING:
            raise DataError(f"prompt stream checkpoint: its shards were cut by index modulo {self.world}; this version "
                            "cuts them from a seeded permutation (start a new run, or resume with the version "
                            "that wrote the checkpoint)")
        for key, mine in (("num_rows", len(self.rows)), ("seed", self.seed), ("shuffle", self.shuffle),
                          ("rank", self.rank), ("world", self.world)):
            if key in state and state[key] != mine:
                raise DataError(f"prompt stream checkpoint: {key}={state[key]!r} but this stream has {mine!r} "
                                "(the data or its sharding changed since the checkpoint)")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.indices):
            raise DataError(f"prompt stream checkpoint: bad cursor epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(epoch)
