"""Model checkpoints round-trip exactly and refuse broken input with a clear message."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lite import checkpoint
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


# ---------------------------------------------------------------------------------------------
# Several files, streamed blocks, Hugging Face directories, broken files.

def test_several_files_with_index_round_trip_exactly(model, tmp_path):
    from safetensors.numpy import load_file

    save_model(model, tmp_path / "ckpt", max_file_bytes=60_000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()
    stored = {}
    for name in files:  # read back with safetensors itself
        stored.update(load_file(str(tmp_path / "ckpt" / name)))
    want = model_state_arrays(model)
    assert set(stored) == set(want) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in stored.values())
    loaded = model_state_arrays(load_model(tmp_path / "ckpt"))
    for name in want:
        np.testing.assert_array_equal(stored[name], np.asarray(want[name]), err_msg=name)
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(want[name]), err_msg=name)


@pytest.mark.parametrize("shape", [(), (7,), (5, 3), (3, 4, 5), (2, 3, 4, 6)])
@pytest.mark.parametrize("chunk", [8, 40, 100, 10_000])
def test_save_blocks_tile_each_tensor_in_order(shape, chunk, monkeypatch):
    """The streamed blocks of a tensor concatenate to its bytes, each within the chunk (or one row)."""
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", chunk)
    value = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    blocks = []
    checkpoint._stream_array(jnp.asarray(value), blocks.append)
    assert np.concatenate([b.reshape(-1) for b in blocks]).tobytes() == value.tobytes()
    for block in blocks:
        assert block.nbytes <= max(chunk, 4 * (shape[-1] if shape else 1))


def test_hf_directory_loads_like_its_conversion(tmp_path):
    """load_model reads a Hugging Face directory (index, several files, torch layout) directly; the
    result equals converting it first (lite.convert's streamed writer, another code path)."""
    from lite import convert

    source = pathlib.Path(__file__).parent / "fixtures" / "hf" / "ngram"
    convert.from_hf(source, tmp_path / "ours")
    direct, converted = load_model(source), load_model(tmp_path / "ours")
    assert direct.cfg == converted.cfg
    want, got = model_state_arrays(converted), model_state_arrays(direct)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


def _saved(model, tmp_path, **kwargs) -> pathlib.Path:
    save_model(model, tmp_path / "ckpt", **kwargs)
    return tmp_path / "ckpt"


def test_broken_files_are_one_line_errors_naming_the_file(model, tmp_path):
    directory = _saved(model, tmp_path, max_file_bytes=60_000)
    index = directory / "model.safetensors.index.json"
    first = directory / json.loads(index.read_text())["weight_map"]["embed.token_table"]
    original = first.read_bytes()

    def expect(message):
        with pytest.raises(CheckpointError, match=message) as error:
            load_model(directory)
        assert "\n" not in str(error.value)

    first.write_bytes(original[:8] + b"{not json" + original[17:])
    expect(rf"{first.name} is corrupt or unreadable: malformed header")
    length = int.from_bytes(original[:8], "little")
    header = json.loads(original[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(encoded) == length
    first.write_bytes(original[:8] + encoded + original[8 + length:])
    expect(rf"{first.name} is corrupt or unreadable: tensor {name} .* data offsets")
    first.write_bytes(original)
    good_index = index.read_text()
    index.write_text('{"weight_map": [1, 2]}')
    expect(r"model.safetensors.index.json is not a valid safetensors index")
    index.write_text(good_index)
    first.unlink()
    expect(rf"{first.name} is listed in model.safetensors.index.json but missing")


def test_integer_weights_for_float_parameters_are_refused(model, tmp_path):
    from safetensors.numpy import save_file

    directory = _saved(model, tmp_path)
    arrays = {k: np.asarray(v) for k, v in model_state_arrays(model).items()}
    arrays["final_norm.weight"] = arrays["final_norm.weight"].astype(np.int32)
    save_file(arrays, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor final_norm.weight holds int32 values, "
                                              r"but the model's final_norm.weight is float32"):
        load_model(directory)


def test_sharded_load_and_save_on_8_devices():
    """tests/checkpoint_mesh_cases.py in its own process with 8 fake CPU devices."""
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).parent.parent
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                           "tests/checkpoint_mesh_cases.py"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-6000:] + done.stderr[-3000:]
