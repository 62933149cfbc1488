"""Config: round trip, composition and override precedence, error messages, CLI exit codes."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from archer_async.config import (
    Config,
    ConfigError,
    iter_fields,
    load_config,
    parse_override,
    resume_config,
    to_yaml,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "launch" / "configs").glob("*.yaml"))


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_defaults_match_algorithm_md():
    loss = Config().loss
    assert loss.entropy_quantile == 0.8
    assert (loss.low_entropy_clip_ratio_low, loss.low_entropy_clip_ratio_high) == (0.2, 0.2)
    assert (loss.high_entropy_clip_ratio_low, loss.high_entropy_clip_ratio_high) == (0.5, 0.5)
    assert loss.dual_clip_c == 10.0
    assert (loss.kl_coef_low_entropy, loss.kl_coef_high_entropy) == (0.001, 0.0)
    assert loss.loss_agg == "seq-mean-token-mean"
    assert loss.is_correction == "token_tis"
    assert (loss.is_cap, loss.is_mask_low, loss.is_mask_high) == (2.0, 0.5, 2.0)
    assert Config().buffer.max_staleness == 4


def test_every_field_has_a_docstring():
    missing = [key for key, field in iter_fields() if not (field.description or "").strip()]
    assert missing == []


def test_round_trip_is_identity(tmp_path):
    cfg = load_config([], ["loss.is_cap=3.5", "actors.num_actors=3", "run_dir=" + str(tmp_path / "r")])
    again = load_config([_write(tmp_path, "resolved.yaml", to_yaml(cfg))])
    assert again == cfg
    assert again.loss.is_cap == 3.5 and again.actors.num_actors == 3


def test_files_compose_left_to_right_then_overrides_win(tmp_path):
    a = _write(tmp_path, "a.yaml", """
        loss: {is_cap: 3.0, is_correction: token_mask}
        actors: {num_actors: 4}
    """)
    b = _write(tmp_path, "b.yaml", """
        loss: {is_cap: 5.0}
    """)
    cfg = load_config([a, b], ["actors.num_actors=6"])
    assert cfg.loss.is_cap == 5.0            # b overrides a
    assert cfg.loss.is_correction == "token_mask"  # a's key kept (deep merge)
    assert cfg.actors.num_actors == 6        # override beats both files
    cfg2 = load_config([b, a])
    assert cfg2.loss.is_cap == 3.0           # order matters


def test_override_values_are_typed():
    assert parse_override("loss.dual_clip_c=null") == {"loss": {"dual_clip_c": None}}
    assert parse_override("data.train_files=[a.jsonl, b.jsonl]") == {"data": {"train_files": ["a.jsonl", "b.jsonl"]}}
    assert load_config([], ["loss.dual_clip_c=null"]).loss.dual_clip_c is None


def test_unknown_key_names_dotted_path(tmp_path):
    with pytest.raises(ConfigError, match=r"loss\.no_such_key: unknown key"):
        load_config([], ["loss.no_such_key=1"])
    f = _write(tmp_path, "bad.yaml", "buffer:\n  capacityy: 3\n")
    with pytest.raises(ConfigError, match=r"buffer\.capacityy: unknown key"):
        load_config([f])
    with pytest.raises(ConfigError, match=r"nosection: unknown key"):
        load_config([], ["nosection.x=1"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as e:
        load_config([], ["actors.num_actors=many"])
    assert "actors.num_actors" in str(e.value) and "'many'" in str(e.value)
    with pytest.raises(ConfigError, match=r"loss\.loss_agg"):
        load_config([], ["loss.loss_agg=sum"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = _write(tmp_path, "broken.yaml", "loss:\n  is_cap: [1, 2\nactors: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config([f])
    assert "broken.yaml:" in str(e.value) and "malformed YAML" in str(e.value)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("loss.is_cap")


def test_batch_must_divide_into_mini_batches():
    with pytest.raises(ConfigError, match="mini_batch_groups"):
        load_config([], ["learner.batch_groups=6", "learner.mini_batch_groups=4"])


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate(path):
    cfg = load_config([str(path)])
    assert isinstance(cfg, Config)


def test_shipped_config_set_is_complete():
    names = {p.name for p in SHIPPED}
    assert {"tiny_cpu.yaml", "archer_code_1.5b.yaml", "single_gpu.yaml"} <= names


def test_archer_recipe_matches_algorithm_md():
    cfg = load_config([str(ROOT / "launch" / "configs" / "archer_code_1.5b.yaml")])
    assert cfg.learner.batch_groups == 64 and cfg.actors.samples_per_prompt == 16
    assert cfg.learner.mini_batch_groups == 32 and cfg.learner.ppo_epochs == 3
    assert cfg.learner.lr == 1e-6 and cfg.learner.weight_decay == 0.1 and cfg.learner.grad_clip == 1.0
    assert cfg.learner.warmup_steps == 10
    assert cfg.actors.max_response_length == 32768 and cfg.data.max_prompt_length == 2048
    assert cfg.actors.temperature == 1.0 and cfg.actors.eval_temperature == 0.8
    assert cfg.model.dtype == "bfloat16" and cfg.learner.reduce_dtype == "float32"
    assert cfg.launch.ray_address == "auto"  # the labelled multi-node cluster, never a fresh one-node one


def test_resume_config_pins_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.resolved.yaml").write_text(to_yaml(load_config([], ["run_dir=elsewhere", "loss.is_cap=4"])))
    cfg = resume_config(run, ["learner.total_steps=99"])
    assert cfg.run_dir == str(run) and cfg.loss.is_cap == 4 and cfg.learner.total_steps == 99
    with pytest.raises(ConfigError, match="not a run directory"):
        resume_config(tmp_path / "nope")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_cli_dry_run_prints_resolved_yaml():
    r = _cli("train", "--dry-run", "loss.is_cap=2.5", "run_dir=runs/x")
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert data["loss"]["is_cap"] == 2.5 and data["run_dir"] == "runs/x"


def test_cli_bad_input_exits_2_with_one_clear_line(tmp_path):
    r = _cli("train", "--dry-run", "loss.no_such_key=1")
    assert r.returncode == 2
    assert r.stderr.strip() == "archer-async: invalid config: loss.no_such_key: unknown key"
    r = _cli("train", "--dry-run", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_help_lists_every_command():
    r = _cli("--help")
    assert r.returncode == 0
    for cmd in ("train", "resume", "eval", "score", "dashboard", "buffer"):
        assert cmd in r.stdout
