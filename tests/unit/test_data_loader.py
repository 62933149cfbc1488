"""verl-format loading: parquet / JSON / JSONL, validation errors naming file, row and field."""

import json

import pytest

from archer_async.config import DataConfig, UserError
from archer_async.data import DataError, default_datasets, load_dataset, load_rows
from archer_async.taskgen import generate_tasks, write_jsonl


@pytest.fixture(scope="module")
def rows():
    train, _ = generate_tasks(12, 0, seed=0)
    return train


def test_reads_jsonl_json_and_parquet_identically(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(rows, tmp_path / "a.jsonl")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    got_jsonl = load_rows(tmp_path / "a.jsonl")
    got_json = load_rows(tmp_path / "a.json")
    got_pq = load_rows(tmp_path / "a.parquet")
    assert got_jsonl == rows and got_json == rows
    assert [r["prompt"] for r in got_pq] == [r["prompt"] for r in rows]
    assert [r["reward_model"]["ground_truth"] for r in got_pq] == [r["reward_model"]["ground_truth"] for r in rows]
    assert [r["extra_info"]["index"] for r in got_pq] == list(range(len(rows)))
    both = load_dataset([str(tmp_path / "a.jsonl"), str(tmp_path / "a.parquet")])
    assert len(both) == 2 * len(rows)


def _expect(path, *needles):
    with pytest.raises(DataError) as ei:
        load_rows(path)
    msg = str(ei.value)
    assert isinstance(ei.value, UserError)
    for n in needles:
        assert n in msg, msg
    return msg


def test_jsonl_errors_name_file_line_and_field(tmp_path, rows):
    good = json.dumps(rows[0])
    p = tmp_path / "bad.jsonl"
    p.write_text(good + "\n" + good + "\n{not json\n")
    _expect(p, str(p), ":3", "invalid JSON")

    bad = dict(rows[0], reward_model={"style": "rule"})
    p.write_text(good + "\n" + json.dumps(bad) + "\n")
    _expect(p, str(p), ":2", "reward_model.ground_truth")

    bad = dict(rows[0], prompt="just a string")
    p.write_text(json.dumps(bad) + "\n")
    _expect(p, ":1", "'prompt'")

    bad = dict(rows[0], prompt=[{"role": "user", "content": 5}])
    p.write_text(good + "\n\n" + json.dumps(bad) + "\n")  # blank lines still count
    _expect(p, ":3", "prompt[0].content")

    bad = {k: v for k, v in rows[0].items() if k != "data_source"}
    p.write_text(json.dumps(bad) + "\n")
    _expect(p, ":1", "data_source")


def test_json_and_parquet_errors_name_row_index(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = [rows[0], rows[1], dict(rows[2], reward_model={"style": "rule", "ground_truth": None})]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    _expect(p, str(p), "row 2", "reward_model.ground_truth")
    p.write_text(json.dumps({"rows": rows}))
    _expect(p, "list of rows")
    p.write_text("[1, 2,")
    _expect(p, "invalid JSON")

    q = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([dict(r, prompt=None) if i == 1 else r for i, r in enumerate(rows[:3])]), q)
    _expect(q, str(q), "row 1", "'prompt'")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    _expect(tmp_path / "junk.parquet", "parquet")


def test_missing_file_and_unknown_format(tmp_path):
    _expect(tmp_path / "nope.jsonl", "not found")
    (tmp_path / "x.csv").write_text("a,b\n")
    _expect(tmp_path / "x.csv", "unknown data format")


def test_default_datasets_embedded_and_from_files(tmp_path, rows):
    cfg = DataConfig(tiny_num_train=40, tiny_num_eval=10, seed=1)
    train, evals = default_datasets(cfg)
    assert (train, evals) == generate_tasks(40, 10, 1)
    write_jsonl(rows, tmp_path / "t.jsonl")
    train2, evals2 = default_datasets(DataConfig(train_files=[str(tmp_path / "t.jsonl")], tiny_num_eval=10, seed=1))
    assert train2 == rows and evals2 == evals
