"""Ranges and finiteness of every numeric setting: pydantic Field bounds, refused at parse time by key."""

import typing
from pathlib import Path

import annotated_types as at
import pytest

from archer_async.config import Config, ConfigError, LossConfig, iter_fields, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "launch" / "configs").glob("*.yaml"))


def _numeric(ann) -> bool:
    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Union:
        return any(_numeric(a) for a in args if a is not type(None))
    return ann in (int, float)


def test_every_numeric_setting_has_a_lower_bound():
    unbounded = [key for key, f in iter_fields(Config) if _numeric(f.annotation)
                 and not any(isinstance(m, (at.Ge, at.Gt)) for m in f.metadata)]
    assert unbounded == []


def test_floats_refuse_nan_and_inf_everywhere():
    assert Config.model_config["allow_inf_nan"] is False


@pytest.mark.parametrize("override,message", [
    ("learner.mini_batch_groups=0", "learner.mini_batch_groups = 0: must be >= 1"),
    ("learner.total_steps=0", "learner.total_steps = 0: must be >= 1"),
    ("learner.batch_groups=-4", "learner.batch_groups = -4: must be >= 1"),
    ("buffer.capacity=0", "buffer.capacity = 0: must be >= 1"),
    ("actors.num_actors=0", "actors.num_actors = 0: must be >= 1"),
    ("actors.samples_per_prompt=0", "actors.samples_per_prompt = 0: must be >= 1"),
    ("dashboard.port=70000", "dashboard.port = 70000: must be <= 65535"),
    ("buffer.port=-1", "buffer.port = -1: must be >= 0"),
    ("sync.store_port=65536", "sync.store_port = 65536: must be <= 65535"),
    ("learner.lr=.nan", "learner.lr = nan: must be a finite number"),
    ("learner.lr=.inf", "learner.lr = inf: must be a finite number"),
    ("learner.lr=0", "learner.lr = 0: must be > 0"),
    ("actors.temperature=-.inf", "actors.temperature = -inf: must be a finite number"),
    ("actors.temperature=0", "actors.temperature = 0: must be > 0"),
    ("actors.top_p=1.5", "actors.top_p = 1.5: must be <= 1"),
    ("actors.gpu_memory_utilization=2", "actors.gpu_memory_utilization = 2: must be <= 1"),
    ("learner.betas=[0.9,1.5]", "learner.betas.1 = 1.5: must be < 1"),
    ("rewards.timeout_s=.inf", "rewards.timeout_s = inf: must be a finite number"),
    ("rewards.workers=0", "rewards.workers = 0: must be >= 1"),
    ("sync.timeout_s=0", "sync.timeout_s = 0: must be > 0"),
    ("launch.eval_k=0", "launch.eval_k = 0: must be >= 1"),
    ("data.max_prompt_length=0", "data.max_prompt_length = 0: must be >= 1"),
    ("loss.is_cap=.nan", "loss.is_cap = nan: must be a finite number"),
    ("learner.checkpoint_every=0", "learner.checkpoint_every = 0: must be >= 1"),
])
def test_bad_numbers_are_refused_at_parse_time_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_stay_valid(path):
    load_config([str(path)])


def test_defaults_stay_valid_and_optional_bounds_accept_null():
    load_config()
    load_config([], ["actors.max_model_len=null", "loss.dual_clip_c=null", "rewards.cpu_time_s=null"])


def test_unvalidated_loss_config_is_checked_against_the_same_bounds():
    bad = LossConfig.model_construct(is_cap=0.5, entropy_quantile=float("nan"))
    assert dict(bad.problems()) == {"is_cap": "0.5: must be >= 1", "entropy_quantile": "nan: must be a finite number"}
    assert LossConfig().problems() == []


@pytest.mark.parametrize("content,message", [
    (b"learner:\n  lr: \"\xff\xfe\"\n", "not UTF-8"),
    (("a: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "nested too deeply"),
])
def test_unreadable_yaml_is_one_config_error(tmp_path, content, message):
    p = tmp_path / "bad.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_config([str(p)])
    assert str(p) in str(e.value)
