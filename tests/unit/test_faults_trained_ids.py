"""The trained-ids record: durable rows per step, a torn row (killed mid-write) never swallows the next
one, and a resume cuts every step past the restored checkpoint."""

from learner import trained_ids


def test_append_read_truncate(tmp_path):
    for step in (1, 2, 3):
        trained_ids.append_step(tmp_path, step, [f"a-g{step}"], [f"a-{step}-0", f"a-{step}-1"])
    assert [r["step"] for r in trained_ids.read_rows(tmp_path)] == [1, 2, 3]
    assert trained_ids.truncate_after(tmp_path, 2) == 1
    rows = trained_ids.read_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["sample_ids"] == ["a-2-0", "a-2-1"]
    assert trained_ids.truncate_after(tmp_path, 5) == 0


def test_torn_row_is_skipped_and_next_row_survives(tmp_path):
    trained_ids.append_step(tmp_path, 1, ["g1"], ["s1"])
    with open(trained_ids.path_of(tmp_path), "ab") as f:
        f.write(b'{"step": 2, "group_ids": ["g2"], "sam')  # killed mid-write
    trained_ids.append_step(tmp_path, 2, ["g2"], ["s2"])  # the re-trained step after resume
    rows = trained_ids.read_rows(tmp_path)
    assert [(r["step"], r["sample_ids"]) for r in rows] == [(1, ["s1"]), (2, ["s2"])]
    assert trained_ids.truncate_after(tmp_path, 1) == 1
    assert trained_ids.path_of(tmp_path).read_bytes().count(b"\n") == 1  # the torn bytes are gone too


def test_missing_file(tmp_path):
    assert trained_ids.read_rows(tmp_path) == [] and trained_ids.truncate_after(tmp_path, 0) == 0
