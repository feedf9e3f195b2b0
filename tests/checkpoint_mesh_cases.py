"""Sharded checkpoint load and save on 8 fake CPU devices.

Run by tests/test_checkpoint.py in its own pytest process (XLA_FLAGS must be set before JAX starts):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/checkpoint_mesh_cases.py
"""

import pathlib
import tracemalloc

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from lite import checkpoint
from lite.checkpoint import load_model, model_state_arrays, save_model
from lite.config import get_config
from lite.model import LongcatModel
from sharding.mesh import make_mesh
from sharding.rules import shard_model, state_specs

assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
# 8 FFN experts (expert=4 splits them), a model dimension fsdp=2 splits, N-gram rows over all 8.
CFG = get_config("tiny", n_routed_experts=8, zero_expert_num=4, moe_topk=3, target_ffn_experts_per_token=2.0)
MESH = "fsdp=2,expert=4"


def stored_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of the directory, read by safetensors itself."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def assert_sharded_as_the_rules_say(model, mesh):
    state = nnx.state(model)
    specs = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state_specs(state, mesh))}
    for name, array in model_state_arrays(model).items():
        assert array.sharding.spec == specs[name] and array.sharding.mesh.shape == mesh.shape, name
    assert any(len(set(map(str, specs[n]))) > 1 for n in specs)  # something is really split


def test_sharded_load_equals_the_stored_tensors(tmp_path):
    model = LongcatModel(CFG, rngs=nnx.Rngs(0))
    save_model(model, tmp_path / "ckpt", max_file_bytes=100_000)
    mesh = make_mesh(MESH)
    loaded = load_model(tmp_path / "ckpt", mesh=mesh)
    assert_sharded_as_the_rules_say(loaded, mesh)
    stored = stored_tensors(tmp_path / "ckpt")
    plain = model_state_arrays(load_model(tmp_path / "ckpt"))
    for name, array in model_state_arrays(loaded).items():
        np.testing.assert_array_equal(np.asarray(array), stored[name], err_msg=name)
        np.testing.assert_array_equal(np.asarray(plain[name]), stored[name], err_msg=name)
        for shard in array.addressable_shards:  # each device holds exactly its slice
            np.testing.assert_array_equal(np.asarray(shard.data), stored[name][shard.index], err_msg=name)


def test_sharded_hf_load_equals_its_conversion(tmp_path):
    from lite import convert

    convert.from_hf(FIXTURES / "ngram", tmp_path / "ours")
    mesh = make_mesh("data=2,expert=4")
    loaded = load_model(FIXTURES / "ngram", mesh=mesh)
    assert_sharded_as_the_rules_say(loaded, mesh)
    stored = stored_tensors(tmp_path / "ours")
    for name, array in model_state_arrays(loaded).items():
        np.testing.assert_array_equal(np.asarray(array), stored[name].astype(array.dtype), err_msg=name)


@pytest.mark.parametrize("chunk", [256, 1 << 30])
def test_save_of_a_sharded_model_writes_the_same_bytes(tmp_path, monkeypatch, chunk):
    """Streamed in blocks from the shards (a small chunk forces many blocks per tensor)."""
    model = LongcatModel(CFG, rngs=nnx.Rngs(1))
    save_model(model, tmp_path / "alone")
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", chunk)
    save_model(shard_model(model, make_mesh(MESH)), tmp_path / "sharded")
    written = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("alone", "sharded")]
    assert written[0] == written[1]


def test_sharded_load_never_holds_a_whole_tensor(tmp_path):
    """Host (NumPy) memory in flight during a sharded load (its peak less what stays: on CPU the
    devices may keep the NumPy slices as their buffers) stays near one device's slice of the
    largest tensor, far below the tensor."""
    cfg = CFG.replace(vocab_size=4096, ngram_vocab_ratio=8)
    model = LongcatModel(cfg, rngs=nnx.Rngs(0))
    save_model(model, tmp_path / "ckpt")
    table = model_state_arrays(model)["embed.ngram_table"]
    del model
    mesh = make_mesh("data=8")
    tracemalloc.start()
    loaded = load_model(tmp_path / "ckpt", mesh=mesh)
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    in_flight = peak - kept
    assert len(loaded.embed.ngram_table.sharding.device_set) == 8
    assert not loaded.embed.ngram_table.sharding.is_fully_replicated
    token_table = cfg.vocab_size * cfg.hidden_size * 4  # replicated: every device gets a whole copy, one at a time
    # A few slices at most (one being read, transfers to devices finishing), never the table.
    assert in_flight < max(table.nbytes / 8, token_table) * 4 < table.nbytes, (in_flight, peak, table.nbytes)
