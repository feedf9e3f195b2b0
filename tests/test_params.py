"""Parameter accounting from abstract shapes against the published sizes and hand arithmetic."""

import pytest

from lite.config import get_config
from lite.params import count_params, format_table, main


def test_longcat_flash_lite_sizes():
    counts = count_params(get_config("longcat-flash-lite"))
    assert counts.total == pytest.approx(68.5e9, abs=0.1e9)
    assert counts.by_component["N-gram tables"] == pytest.approx(31.4e9, abs=0.05e9)
    low, high = counts.activated_range
    assert low == pytest.approx(2.9e9, abs=0.05e9) and high == pytest.approx(4.5e9, abs=0.05e9)


def test_longcat_flash_sizes():
    counts = count_params(get_config("longcat-flash"))
    assert counts.total == pytest.approx(560e9, abs=2e9)
    assert "N-gram tables" not in counts.by_component
    low, high = counts.activated_range
    assert low == pytest.approx(18.6e9, abs=0.1e9) and high == pytest.approx(31.3e9, abs=0.1e9)


def test_tiny_by_hand():
    c = get_config("tiny")
    d, h = c.hidden_size, c.num_heads
    mla = (d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
           + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
           + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim) + h * c.v_head_dim * d)
    layer = 2 * mla + 2 * 3 * d * c.ffn_hidden_size + 4 * d + d * c.num_experts \
        + c.n_routed_experts * 3 * d * c.expert_ffn_hidden_size
    ngram = sum(c.ngram_table_sizes) * d // c.num_ngram_tables + c.num_ngram_tables * (d // c.num_ngram_tables) * d
    total = c.num_layers * layer + 2 * c.vocab_size * d + d + ngram
    counts = count_params(c)
    assert counts.total == total
    assert counts.activated(0) == total - c.vocab_size * d - sum(c.ngram_table_sizes) * d // c.num_ngram_tables \
        - c.num_layers * c.n_routed_experts * 3 * d * c.expert_ffn_hidden_size


def test_demo_preset_is_mostly_ngram_embedding():
    counts = count_params(get_config("demo"))
    assert 10e6 <= counts.total <= 30e6
    assert counts.by_component["N-gram tables"] >= 0.4 * counts.total


def test_cli_prints_table_and_rejects_unknown_preset(capsys):
    assert main(["longcat-flash-lite"]) == 0
    out = capsys.readouterr().out
    assert "N-gram tables" in out and "68.562B" in out
    assert main(["nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert "activated per token" in format_table(get_config("tiny"), count_params(get_config("tiny")))
