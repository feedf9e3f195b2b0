"""Hugging Face checkpoint conversion: logits / routing / greedy parity with `transformers` on the
committed golden fixtures (scripts/make_hf_fixtures.py), exact round trips, config translation,
and clear errors on checkpoints that do not fit their config."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lite import convert
from lite.checkpoint import CheckpointError, TensorPlan, load_model, write_safetensors
from lite.config import ConfigError, YarnScaling, get_config
from lite import hf as hf_lib
from lite.hf import is_ignored_hf_key

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
CASES = ("plain", "yarn", "ngram")


def hf_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a HF directory (single file or shards), read independently of lite.convert."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        out.update(load_file(str(directory / name)))
    return out


def check_parity(hf_dir: pathlib.Path, work: pathlib.Path) -> None:
    """Import, then compare with what transformers computed: logits, routing, greedy tokens."""
    expected = np.load(hf_dir / "expected.npz")
    assert expected["bias_changed_choices"] > 0 and expected["zero_expert_choices"] > 0  # the fixture's point
    convert.from_hf(hf_dir, work / "ours")
    model = load_model(work / "ours")
    forward = nnx.jit(lambda m, t, s: m(t, s))  # one shape, one compilation, for all calls below
    tokens = expected["tokens"]
    out = forward(model, jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32))
    np.testing.assert_allclose(np.asarray(out.logits), expected["logits"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.expert_counts), expected["expert_counts"])
    # Greedy decoding by full recomputation in row 0; right padding is segment 0 (never attended).
    want, prompt = expected["greedy"][0], int(expected["prompt_length"])
    row = np.zeros(tokens.shape, np.int32)
    row[0, :prompt] = want[:prompt]
    for n in range(prompt, len(want)):
        segments = np.zeros(tokens.shape, np.int32)
        segments[0, :n] = 1
        logits = forward(model, jnp.asarray(row), jnp.asarray(segments)).logits
        row[0, n] = int(jnp.argmax(logits[0, n - 1]))
    np.testing.assert_array_equal(row[0, :len(want)], want)


@pytest.mark.parametrize("case", CASES)
def test_logits_routing_and_greedy_match_transformers(case, tmp_path):
    check_parity(FIXTURES / case, tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_hf_ours_hf_round_trip_is_byte_identical(case, tmp_path):
    source = FIXTURES / case
    cfg = convert.from_hf(source, tmp_path / "ours")
    convert.to_hf(tmp_path / "ours", tmp_path / "back")
    original, back = hf_tensors(source), hf_tensors(tmp_path / "back")
    kept = {k for k in original if not is_ignored_hf_key(k, cfg)}
    assert kept < set(original)  # the fixtures carry zero-expert projections (and ngram an mtp tensor)
    stubs = set(back) - kept
    # Both exports carry zero-filled zero-expert gate/up: the transformers trunk (which the N-gram
    # model's remote code builds on) refuses a checkpoint without them.
    assert stubs == {k for k in original if ".mlp.experts." in k and k not in kept} and stubs
    for key in stubs:
        assert not back[key].any()
    for key in kept:
        assert back[key].dtype == original[key].dtype and back[key].tobytes() == original[key].tobytes(), key
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == (
        "longcat_flash_ngram" if case == "ngram" else "longcat_flash")
    assert (tmp_path / "back" / "generation_config.json").exists()  # small side files travel along
    assert cfg.pad_token_id == 0 and json.loads((tmp_path / "back" / "config.json").read_text())["pad_token_id"] == 0


def test_ours_hf_ours_round_trip_is_exact_with_sharded_export(tmp_path):
    import ml_dtypes
    from lite.checkpoint import config_to_dict, state_shapes

    cfg = get_config("tiny", param_dtype="bfloat16", rope_scaling=YarnScaling(factor=2.0, original_max_position_embeddings=64))
    rng = np.random.default_rng(0)
    ours = {name: rng.standard_normal(s.shape).astype(ml_dtypes.bfloat16 if s.dtype == jnp.bfloat16 else np.float32)
            for name, s in state_shapes(cfg).items()}
    assert ours["layers.moe.router.classifier"].dtype == np.float32 and ours["lm_head.kernel"].dtype != np.float32
    ours["embed.ngram_table"][cfg.ngram_total_rows:] = 0  # the padding rows, zero in every model state
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    save_file(ours, str(tmp_path / "ours" / "model.safetensors"))
    convert.to_hf(tmp_path / "ours", tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "hf" / "model.safetensors").exists()
    hf = hf_tensors(tmp_path / "hf")
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in hf.values())
    np.testing.assert_array_equal(hf["model.layers.1.mlp.experts.2.up_proj.weight"], ours["layers.moe.w_up"][1, 2].T)
    assert convert.from_hf(tmp_path / "hf", tmp_path / "again") == cfg
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(again) == set(ours)
    for name in ours:
        assert again[name].dtype == ours[name].dtype and again[name].tobytes() == ours[name].tobytes(), name
    load_model(tmp_path / "again")  # and the project loads it


def test_hf_layout_matches_hf_checkpoint_doc():
    """Our tensors assembled from the HF tensors by independent NumPy: stacking and transposes."""
    hf = hf_tensors(FIXTURES / "ngram")
    cfg = convert.hf_lib.config_from_hf(json.loads((FIXTURES / "ngram" / "config.json").read_text()))
    from lite.checkpoint import state_shapes

    shapes = state_shapes(cfg)
    layers, experts = range(cfg.num_layers), range(cfg.n_routed_experts)
    want = {
        "embed.ngram_table": np.concatenate([hf[f"model.ngram_embeddings.embedders.{s}.weight"] for s in range(4)]),
        "embed.ngram_proj": np.stack([hf[f"model.ngram_embeddings.post_projs.{s}.weight"].T for s in range(4)]),
        "lm_head.kernel": hf["lm_head.weight"].T,
        "layers.attns.1.kv_a_proj.kernel": np.stack(
            [hf[f"model.layers.{l}.self_attn.1.kv_a_proj_with_mqa.weight"].T for l in layers]),
        "layers.mlp_norms.0.weight": np.stack([hf[f"model.layers.{l}.post_attention_layernorm.0.weight"] for l in layers]),
        "layers.moe.router.classifier": np.stack([hf[f"model.layers.{l}.mlp.router.classifier.weight"].T for l in layers]),
        "layers.moe.w_down": np.stack([np.stack([hf[f"model.layers.{l}.mlp.experts.{e}.down_proj.weight"].T
                                                 for e in experts]) for l in layers]),
    }
    # Our table ends in zero padding rows (ModelConfig.ngram_padded_rows) that HF does not store.
    assert want["embed.ngram_table"].shape[0] == cfg.ngram_total_rows
    assert shapes["embed.ngram_table"].shape == (cfg.ngram_padded_rows, want["embed.ngram_table"].shape[1])
    layout = convert.hf_lib.tensor_layout(cfg)
    source = convert.SafetensorsDir(FIXTURES / "ngram")
    for name, value in want.items():
        chunks = []
        for piece in layout[name]:
            convert._emit_piece(source, piece.hf_key, (), piece.transpose, chunks.append)
        got = np.concatenate([np.ravel(c) for c in chunks]).reshape(value.shape)
        np.testing.assert_array_equal(got, value, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Config translation.

def test_from_hf_config_reads_every_field():
    hf = json.loads((FIXTURES / "yarn" / "config.json").read_text())
    cfg = hf_lib.config_from_hf(hf)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (128, 32, 2, 2)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (16, 8, 8, 8, 8)
    assert (cfg.n_routed_experts, cfg.zero_expert_num, cfg.moe_topk, cfg.expert_ffn_hidden_size) == (4, 3, 3, 16)
    assert (cfg.ffn_hidden_size, cfg.routed_scaling_factor, cfg.rope_theta, cfg.max_position_embeddings) == (48, 1.5, 1e4, 64)
    assert not cfg.has_ngram and cfg.param_dtype == "float32"
    assert cfg.rope_scaling == YarnScaling(factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
                                           beta_slow=1.0, mscale=1.0, mscale_all_dim=0.8)
    lite = hf_lib.config_from_hf(json.loads((FIXTURES / "ngram" / "config.json").read_text()))
    assert (lite.ngram_n, lite.ngram_k, lite.ngram_vocab_ratio, lite.rope_scaling) == (3, 2, 2, None)


def test_legacy_and_v5_rope_forms_agree_and_absent_mscale_means_unused():
    base = json.loads((FIXTURES / "plain" / "config.json").read_text())
    base.pop("rope_parameters")
    yarn = {"factor": 8.0, "original_max_position_embeddings": 32}
    legacy = hf_lib.config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "yarn", **yarn}})
    v5 = hf_lib.config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, **yarn}})
    assert legacy == v5 and legacy.rope_theta == 5e5
    # transformers treats absent mscale / mscale_all_dim as unset: attention factor 0.1 ln(8) + 1,
    # softmax scale unchanged.
    from lite.rope import rope_frequencies, softmax_scale

    assert rope_frequencies(legacy)[1] == pytest.approx(0.1 * np.log(8.0) + 1)
    assert softmax_scale(legacy) == pytest.approx(legacy.qk_head_dim ** -0.5)
    # factor absent: max_position_embeddings / original (transformers' rule)
    derived = hf_lib.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 16}})
    assert derived.rope_scaling.factor == base["max_position_embeddings"] / 16


@pytest.mark.parametrize("preset", ["tiny", "demo", "longcat-flash-lite", "longcat-flash"])
def test_config_round_trips_through_hf(preset):
    cfg = get_config(preset)
    hf = hf_lib.config_to_hf(cfg)
    assert hf["model_type"] == ("longcat_flash_ngram" if cfg.has_ngram else "longcat_flash")
    assert hf["num_hidden_layers"] == 2 * cfg.num_layers and hf["head_dim"] == cfg.qk_rope_head_dim
    assert hf_lib.config_from_hf(json.loads(json.dumps(hf))) == cfg
    bare = {k: v for k, v in hf.items() if k != "lite"}  # a config written by someone else
    assert hf_lib.config_from_hf(bare).replace(name=cfg.name, compute_dtype=cfg.compute_dtype,
                                                    target_ffn_experts_per_token=cfg.target_ffn_experts_per_token,
                                                    router_bias_update_rate=cfg.router_bias_update_rate,
                                                    remat=cfg.remat) == cfg


def test_released_lite_config_shape():
    """The fields the released Lite config.json uses, with a v4-style rope and an eos list."""
    hf = hf_lib.config_to_hf(get_config("longcat-flash-lite"))
    hf.pop("lite"), hf.pop("num_layers")
    hf["eos_token_id"] = [2, 3]
    cfg = hf_lib.config_from_hf(hf)
    assert cfg.num_layers == 14 and cfg.eos_token_id == 2 and cfg.target_ffn_experts_per_token == 8.0
    assert cfg.ngram_table_sizes[0] == 78 * 131072 + 1


@pytest.mark.parametrize("case", CASES)
def test_released_config_without_model_type_or_dtype(case):
    """Copies of the released configs lack model_type (transformers goes by architectures) and may
    lack a dtype field: the kind comes from architectures or the N-gram fields, the dtype is float32."""
    hf = json.loads((FIXTURES / case / "config.json").read_text())
    want = hf_lib.config_from_hf(hf)
    no_type = {k: v for k, v in hf.items() if k != "model_type"}
    assert hf_lib.config_from_hf(no_type) == want
    bare = {k: v for k, v in no_type.items() if k != "architectures"}  # only the fields themselves left
    assert hf_lib.config_from_hf(bare) == want
    assert want.has_ngram == (case == "ngram")
    no_dtype = {k: v for k, v in hf.items() if k not in ("dtype", "torch_dtype")}
    assert hf_lib.config_from_hf(no_dtype).param_dtype == "float32"
    assert hf_lib.config_from_hf({**no_dtype, "torch_dtype": "bfloat16"}).param_dtype == "bfloat16"


def test_export_writes_generation_and_tokenizer_configs(tmp_path):
    """An export of a checkpoint that holds only tokenizer.model (train.py's) gets the
    generation_config.json and tokenizer_config.json transformers reads its special tokens from."""
    import sentencepiece as spm

    texts = [f"word{i} and more text number {i % 7}" for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "tok"), vocab_size=60,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    convert.from_hf(FIXTURES / "plain", tmp_path / "ours")
    for name in ("generation_config.json",):
        (tmp_path / "ours" / name).unlink(missing_ok=True)
    shutil.copyfile(tmp_path / "tok.model", tmp_path / "ours" / "tokenizer.model")
    convert.to_hf(tmp_path / "ours", tmp_path / "hf")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<s>", "</s>")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (tmp_path / "tok.model").read_bytes()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"head_dim": 4}, "head_dim=4 must equal qk_rope_head_dim=8"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear' is not supported"),
    ({"q_lora_rank": None}, "lacks q_lora_rank"),
    ({"dtype": "float8"}, "dtype 'float8' is not supported"),
])
def test_bad_hf_config_is_a_clear_error(change, message):
    hf = {**json.loads((FIXTURES / "plain" / "config.json").read_text()), **change}
    with pytest.raises(ConfigError, match=message):
        hf_lib.config_from_hf(hf)


def test_amplified_embedding_cannot_be_exported():
    with pytest.raises(ConfigError, match="embedding_amplification='sqrt_d' has no Hugging Face"):
        hf_lib.config_to_hf(get_config("tiny", embedding_amplification="sqrt_d"))


# ---------------------------------------------------------------------------------------------
# Bad checkpoints.

def _broken_copy(tmp_path, edit) -> pathlib.Path:
    target = tmp_path / "broken"
    shutil.copytree(FIXTURES / "plain", target)
    tensors = load_file(str(target / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_missing_tensor_is_named(tmp_path):
    broken = _broken_copy(tmp_path, lambda t: t.pop("model.layers.1.self_attn.0.q_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.self_attn.0.q_b_proj.weight'\]"):
        convert.from_hf(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_unexpected_tensor_is_named(tmp_path):
    broken = _broken_copy(tmp_path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.layers.0.extra.weight'\]"):
        convert.from_hf(broken, tmp_path / "out")


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    key = "model.layers.0.mlps.1.down_proj.weight"
    broken = _broken_copy(tmp_path, lambda t: t.update({key: np.zeros((32, 40), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"tensor {key}: checkpoint has shape \(32, 40\), the model expects \(32, 48\)"):
        convert.from_hf(broken, tmp_path / "out")


def test_no_weights_is_a_clear_error(tmp_path):
    (tmp_path / "hf").mkdir()
    shutil.copy(FIXTURES / "plain" / "config.json", tmp_path / "hf")
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        convert.from_hf(tmp_path / "hf", tmp_path / "out")


def test_cli_both_directions(tmp_path, capsys):
    convert.main(["--from-hf", str(FIXTURES / "plain"), "--out", str(tmp_path / "ours"), "--quiet"])
    convert.main(["--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf"), "--max-shard-size", "100KB"])
    assert "plain model" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    with pytest.raises(SystemExit, match="error: no Hugging Face checkpoint at"):
        convert.main(["--from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])


def test_streamed_writer_matches_safetensors_reader(tmp_path):
    import ml_dtypes

    arrays = {"a": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "b": np.arange(5).astype(ml_dtypes.bfloat16),
              "c": np.ones((3,), np.int64)}
    plans = [TensorPlan(k, v.dtype, v.shape, lambda emit, v=v: [emit(row) for row in v]) for k, v in arrays.items()]
    write_safetensors(tmp_path / "x.safetensors", plans, {"format": "pt"})
    got = load_file(str(tmp_path / "x.safetensors"))
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes()
    bad = [TensorPlan("a", np.float32, (4,), lambda emit: emit(np.zeros(3, np.float32)))]
    with pytest.raises(AssertionError, match="wrote 12 bytes, the header says 16"):
        write_safetensors(tmp_path / "y.safetensors", bad)
