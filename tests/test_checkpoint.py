"""Model checkpoints round-trip exactly and refuse broken input with a clear message."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lite.checkpoint import CheckpointError, load_model, model_state_arrays, save_model
from lite.config import YarnScaling, get_config
from lite.model import LongcatModel


@pytest.fixture(scope="module")
def model():
    cfg = get_config("tiny", rope_scaling=YarnScaling(factor=2.0, original_max_position_embeddings=64))
    model = LongcatModel(cfg, rngs=nnx.Rngs(0))
    model.update_router_bias(jnp.arange(cfg.num_layers * cfg.num_experts, dtype=jnp.float32).reshape(
        cfg.num_layers, cfg.num_experts), rate=0.1)
    return model


def test_round_trip_is_exact(model, tmp_path):
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg
    want, got = model_state_arrays(model), model_state_arrays(loaded)
    assert set(want) == set(got) and "layers.moe.router.bias" in got
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
    tokens = jnp.asarray([[5, 6, 7, 8]])
    np.testing.assert_array_equal(np.asarray(loaded(tokens).logits), np.asarray(model(tokens).logits))


def test_overwrite_replaces_whole_directory(model, tmp_path):
    save_model(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "stale.txt").write_text("x")
    save_model(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path / "nowhere")


def test_corrupt_weights(model, tmp_path):
    save_model(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_model(tmp_path / "ckpt")


def test_config_mismatch_names_tensor_and_shapes(model, tmp_path):
    save_model(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["ffn_hidden_size"] = 64
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor layers.mlps.0.down_proj.kernel: checkpoint has shape "
                                              r"\(2, 128, 64\), the model expects \(2, 64, 64\)"):
        load_model(tmp_path / "ckpt")
    config["ngram_n"] = 0
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unexpected tensors.*embed.ngram_proj"):
        load_model(tmp_path / "ckpt")
