"""`archer-async score`: fields kept in order, reward/status/reason added, malformed input rejected."""

import json
import subprocess
import sys

import pytest

from launch.cli import main

pytestmark = pytest.mark.integration

ROWS = [
    {"data_source": "tiny_code", "prompt": [{"role": "user", "content": "double"}], "ability": "code",
     "reward_model": {"style": "rule", "ground_truth": json.dumps({"inputs": ["2\n"], "outputs": ["4\n"]})},
     "extra_info": {"index": 0}, "response": "</think>```python\nprint(int(input()) * 2)\n```"},
    {"data_source": "tiny_math", "reward_model": {"ground_truth": "5"}, "response": r"</think>\boxed{6}"},
    {"data_source": "livecodebench", "reward_model": {"ground_truth": json.dumps(
        [{"input": "3\n", "output": "0.50\n", "testtype": "stdin", "metadata": {}}])},
     "response": "</think>```python\nimport sys\nprint('0.5')\nsys.exit(2)\n```"},
    {"data_source": "code", "reward_model": {"ground_truth": {"inputs": ["1"], "outputs": ["1"]}},
     "response": "</think>```python\nwhile True: pass\n```"},
]


def test_score_cli_end_to_end(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "score", str(src), "-o", str(out),
                           "--workers", "2", "--timeout", "1.5"], capture_output=True, text=True, timeout=300)
    # 1.5 s per stdin test; the LiveCodeBench row is graded as LiveCodeBench does (0.5 == 0.50, exit code ignored)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 4
    for row, got in zip(ROWS, lines):
        assert list(got)[: len(row)] == list(row) and all(got[k] == v for k, v in row.items())
        assert list(got)[len(row):] == ["reward", "status", "reason"]
    assert [(x["reward"], x["status"]) for x in lines] == [(1, "pass"), (0, "fail"), (1, "pass"), (0, "timeout")]
    assert "scored 4 samples" in proc.stderr and "scoring" in proc.stderr  # summary and progress bar


@pytest.mark.parametrize("line,msg", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"reward_model": {"ground_truth": "1"}, "response": "x"}), "'data_source'"),
    (json.dumps({"data_source": "math", "response": "x"}), "reward_model.ground_truth"),
    (json.dumps({"data_source": "math", "reward_model": {"ground_truth": "1"}}), "'response'"),
    (json.dumps({"data_source": "poetry", "reward_model": {"ground_truth": "1"}, "response": "x"}), "unknown data_source"),
    (json.dumps({"data_source": "code", "reward_model": {"ground_truth": json.dumps({"nope": 1})}, "response": "x"}),
     "reward_model.ground_truth: unknown keys"),
    (json.dumps({"data_source": "kodcode", "reward_model": {"ground_truth": json.dumps("def test_a(): pass")},
                 "response": "x"}), "reward_model.ground_truth: a bare string of test code"),
    (json.dumps({"data_source": "math", "reward_model": {"ground_truth": {"a": 1}}, "response": "x"}),
     "reward_model.ground_truth: a math answer"),
])
def test_malformed_line_names_file_and_line(tmp_path, capsys, line, msg):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(ROWS[1]) + "\n" + line + "\n")
    assert main(["score", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2:" in err and msg in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]  # nothing half-written


def test_missing_input_file(tmp_path, capsys):
    assert main(["score", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
