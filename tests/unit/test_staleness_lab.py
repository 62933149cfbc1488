"""bench/staleness_lab.py without training: the grid, the variants' loss settings and the reports."""

from archer_async.config import LossConfig
from bench.staleness_lab import ABLATION, CORRECTIONS, _series, grid, loss_settings, svg, table


def test_grid_and_variant_settings():
    runs = grid(CORRECTIONS + ABLATION, [0, 2, 8, 32], [0, 1, 2])
    assert len(runs) == 6 * 4 * 3 + 3 * 2 * 3  # the ablation runs at lags 0 and 8 only
    assert ("archer_uniform", 8, 2) in runs and ("archer_uniform", 2, 0) not in runs
    for v in CORRECTIONS + ABLATION:
        LossConfig(**loss_settings(v))  # every variant is a valid loss config
    assert LossConfig(**loss_settings("archer_dual")) == LossConfig()
    uni = LossConfig(**loss_settings("archer_uniform"))
    assert uni.high_entropy_clip_ratio_low == uni.low_entropy_clip_ratio_high == 0.2
    assert LossConfig(**loss_settings("archer_no_kl")).kl_coef_low_entropy == 0.0
    assert LossConfig(**loss_settings("m2po")).is_correction == "m2po"


def _result(variant, lag, seed, final):
    return {"variant": variant, "lag": lag, "seed": seed,
            "steps": [{"step": 1, "ess": 0.5, "grad_norm": 2.0, "mismatch_kl": 0.01, "truncated_frac": 0.1},
                      {"step": 2, "ess": 1.0, "grad_norm": 4.0, "mismatch_kl": 0.03, "truncated_frac": 0.3}],
            "evals": [{"step": 0, "wall_s": 0.0, "accuracy": 0.4}, {"step": 10, "wall_s": 60.0, "accuracy": final}],
            "final_accuracy": final}


def test_table_mean_and_spread_over_seeds_and_svg():
    rows = [_result("none", 8, 0, 0.5), _result("none", 8, 1, 0.7), _result("m2po", 8, 0, 0.6)]
    md = table(rows)
    assert "| none | 8 | 2 | 0.600 ± 0.141 | 0.400 ± 0.000 | 0.750 | 4.000 | 0.0200 | 0.200 |" in md
    assert "| m2po | 8 | 1 | 0.600 | 0.400 | 0.750 | 4.000 | 0.0200 | 0.200 |" in md
    pic = svg(rows)
    assert pic.startswith("<svg") and "lag k = 8: held-out greedy accuracy vs wall time (s)" in pic
    assert pic.count("<polyline") == 2 * 5  # two variants x five panels (accuracy x2, ESS, grad norm, KL)
    assert "lag k = 8: mismatch KL (behaviour vs current) vs step" in pic
    # each line is the mean over seeds
    assert _series(rows[:2], "evals", "step", "accuracy") == [(0.0, 0.4), (10.0, 0.6)]
    assert _series(rows[:2], "steps", "step", "grad_norm") == [(1.0, 2.0), (2.0, 4.0)]
