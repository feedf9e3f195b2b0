import dataclasses

import pytest

from lite.config import ConfigError, ModelConfig, PRESETS, YarnScaling, get_config


def test_presets_load_and_real_sizes_match_architecture():
    lite = get_config("longcat-flash-lite")
    assert (lite.hidden_size, lite.num_layers, lite.num_heads) == (3072, 14, 32)
    assert (lite.n_routed_experts, lite.zero_expert_num, lite.moe_topk) == (256, 128, 12)
    assert lite.num_ngram_tables == 12 and lite.ngram_table_width == 256
    assert lite.ngram_table_sizes == tuple(78 * 131072 + 2 * s + 1 for s in range(12))
    assert lite.ngram_table_orders == (2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4)
    assert lite.rope_scaling == YarnScaling(factor=10.0, original_max_position_embeddings=32768)
    flash = get_config("longcat-flash")
    assert not flash.has_ngram and flash.num_ngram_tables == 0
    assert (flash.hidden_size, flash.n_routed_experts, flash.zero_expert_num) == (6144, 512, 256)
    for name in PRESETS:
        assert get_config(name).name == name


def test_overrides_apply_and_config_is_frozen():
    cfg = get_config("tiny", hidden_size=128, embedding_amplification="sqrt_d")
    assert cfg.hidden_size == 128 and cfg.embedding_amplification == "sqrt_d"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3


def test_flat_table_offsets_are_cumulative_sizes():
    cfg = get_config("tiny")
    offsets, sizes = cfg.ngram_table_offsets, cfg.ngram_table_sizes
    assert offsets[0] == 0
    assert all(offsets[s + 1] - offsets[s] == sizes[s] for s in range(len(sizes) - 1))
    assert cfg.ngram_total_rows == offsets[-1] + sizes[-1]


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny.*demo.*longcat-flash-lite"):
        get_config("huge")


def test_unknown_field_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['hiden_size'\] \(did you mean 'hidden_size'\?\).*"
                                          r"valid fields: .*hidden_size"):
        get_config("tiny", hiden_size=3)
    with pytest.raises(ConfigError) as nothing_close:
        get_config("tiny", xyzzy=3)
    assert "did you mean" not in str(nothing_close.value)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=66), r"hidden_size=66 is not divisible by \(ngram_n-1\)\*ngram_k=4"),
    (dict(moe_topk=7), r"moe_topk=7 is larger than the number of experts .*= 6"),
    (dict(embedding_amplification="x2"), "embedding_amplification must be one of"),
    (dict(param_dtype="float8"), "param_dtype must be one of"),
    (dict(remat="minimal"), r"remat must be one of \('full', 'dots', 'none'\), got 'minimal'"),
    (dict(ngram_n=1), "ngram_n must be 0 .* or >= 2"),
    (dict(eos_token_id=512), r"eos_token_id=512 must lie in \[0, vocab_size=512\)"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim must be even"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(target_ffn_experts_per_token=3.0), r"target_ffn_experts_per_token=3.0 must lie in \[0, moe_topk=2\]"),
    (dict(zero_expert_num=0), "without zero experts"),
    (dict(ngram_vocab_ratio=10**7), "int32 indexing allows"),
    (dict(rope_scaling=YarnScaling(factor=0.5, original_max_position_embeddings=64)), "rope_scaling.factor"),
])
def test_bad_configs_raise_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_config("tiny", **overrides)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="moe_topk"):
        ModelConfig(n_routed_experts=1, zero_expert_num=0, moe_topk=2, target_ffn_experts_per_token=2)
