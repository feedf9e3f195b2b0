"""benchmarks/train_step.py's bound: the matrix products it times are exactly one training step's."""

import pathlib
import sys

import pytest

from lite.params import count_params

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from train_step import step_flops, step_products, variant_config  # noqa: E402


@pytest.mark.parametrize("preset", ["tiny", "demo", "longcat-flash-lite"])
def test_products_cover_every_activated_weight_once_per_token(preset):
    """Per token, the weight products' k * n add up to the activated parameters (count_params, an
    independent tally from the parameter shapes) less the norms' vectors; the embedding is a lookup."""
    cfg = variant_config(preset, "trunk")
    rows, seq_len = 2, 64
    weights, scores = step_products(cfg, rows, seq_len)
    counts = count_params(cfg)
    per_token = sum(m * k * n for m, k, n in weights) / (rows * seq_len)
    assert per_token == counts.activated(cfg.target_ffn_experts_per_token) - counts.by_component["norms"]
    # Attention: per block, scores and values over the causal half of the square, every row and head.
    assert scores == [(rows * cfg.num_heads, cfg.qk_head_dim), (rows * cfg.num_heads, cfg.v_head_dim)] * (2 * cfg.num_layers)
    attention_flops = 3 * rows * cfg.num_heads * seq_len ** 2 * (cfg.qk_head_dim + cfg.v_head_dim) * 2 * cfg.num_layers
    assert step_flops(cfg, rows, seq_len) == 6 * per_token * rows * seq_len + attention_flops
