"""Sharding: mesh specs and logical-axis rules here (one device); the 8-device comparisons run in
their own process (XLA_FLAGS must be set before JAX starts). The TPU and H200 compiles of
lite.plan are in tests/test_aot_compile.py."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from lite.config import ConfigError, get_config
from lite.model import LongcatModel
from sharding.expert_parallel import dropless_context, expert_capacity, ragged_buffer_rows
from sharding.mesh import MeshSpecError, parse_mesh_spec
from sharding.rules import LOGICAL_TO_MESH, describe_param_shardings, logical_to_spec

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mesh_spec_parsing_and_errors():
    assert parse_mesh_spec("expert=4, data=2") == {"data": 2, "expert": 4}  # canonical axis order
    assert parse_mesh_spec("fsdp=16,expert=8") == {"fsdp": 16, "expert": 8}
    for bad, needle in (("model=2", "AXIS=SIZE"), ("data=0", "positive"), ("data=2,data=2", "twice"),
                        ("", "names no axis"), ("data", "AXIS=SIZE")):
        with pytest.raises(MeshSpecError, match=needle):
            parse_mesh_spec(bad)


class FakeMesh:
    """Enough of a Mesh for the rules: axis names and sizes."""

    def __init__(self, **sizes):
        self.shape = sizes
        self.axis_names = tuple(sizes)


def test_every_parameter_has_logical_axes_and_mesh_axes_divide_or_are_dropped():
    cfg = get_config("tiny", n_routed_experts=8)
    state = nnx.state(nnx.eval_shape(lambda: LongcatModel(cfg, rngs=nnx.Rngs(0))))
    mesh = FakeMesh(data=2, fsdp=2, expert=4)
    rows = {path: (shape, spec) for path, shape, spec in describe_param_shardings(state, mesh)}
    assert len(rows) == len(jax.tree.leaves(state))
    for path, (shape, spec) in rows.items():
        for size, entry in zip(shape, spec):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            assert size % int(np.prod([mesh.shape[a] for a in axes])) == 0, path
    assert rows["layers/moe/w_gate"][1] == jax.sharding.PartitionSpec(None, "expert", "fsdp", None)
    assert rows["embed/ngram_table"][1] == jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None)
    # 4112 rows are not divisible by 32: the minor axis is dropped until the rest divide.
    assert logical_to_spec(("ngram_rows", None), (4112, 16), FakeMesh(data=2, fsdp=2, expert=8)) == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert set(LOGICAL_TO_MESH["batch"]) == {"data", "fsdp", "expert"}
    # The released table, padded, splits over every device of a 4x4x8 v5p pod and of 4 x 8 H200s.
    lite = get_config("longcat-flash-lite")
    for mesh in (FakeMesh(fsdp=16, expert=8), FakeMesh(data=4, expert=8), FakeMesh(data=3, expert=8)):
        assert logical_to_spec(("ngram_rows", None), (lite.ngram_padded_rows, lite.ngram_table_width), mesh) == \
            jax.sharding.PartitionSpec(tuple(mesh.axis_names), None)


def test_expert_capacity():
    cfg = get_config("tiny", n_routed_experts=8, moe_topk=3, zero_expert_num=4, target_ffn_experts_per_token=2.0)
    factor = lambda f: cfg.replace(expert_capacity_factor=f)
    assert expert_capacity(64, factor(1.0)) == 16  # 64 tokens * 2 FFN slots / 8 experts
    assert expert_capacity(64, factor(1.25)) == 20
    assert expert_capacity(64, factor(100.0)) == 64  # never more than the tokens
    assert expert_capacity(2, factor(0.01)) == 1
    with pytest.raises(ConfigError, match="expert_dispatch"):
        cfg.replace(expert_dispatch="dense")
    with pytest.raises(ConfigError, match="expert_capacity_factor"):
        cfg.replace(expert_capacity_factor=0.0)
    with dropless_context():  # inference: every token may come
        assert expert_capacity(64, factor(1.0)) == 64


def test_ragged_buffer_rows():
    cfg = get_config("tiny", n_routed_experts=8, moe_topk=3, zero_expert_num=4, target_ffn_experts_per_token=2.0)
    factor = lambda f: cfg.replace(ragged_buffer_factor=f)
    assert ragged_buffer_rows(64, 4, cfg) == 4 * 64 * 3  # default 0: the worst case, every slot of 4 devices
    assert ragged_buffer_rows(64, 4, factor(1.5)) == 192  # 64 tokens * 2 FFN slots * 1.5
    assert ragged_buffer_rows(64, 4, factor(100.0)) == 4 * 64 * 3  # never more than the worst case
    with dropless_context():
        assert ragged_buffer_rows(64, 4, factor(1.5)) == 4 * 64 * 3
    with pytest.raises(ConfigError, match="ragged_buffer_factor"):
        cfg.replace(ragged_buffer_factor=-1.0)


def _run(args, env_extra, timeout):
    env = dict(os.environ, **env_extra)
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return result.stdout


def test_sharded_model_equals_single_device_on_8_cpu_devices():
    out = _run(["-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "tests/sharding_mesh_cases.py"],
               {"XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8",
                "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert "16 passed" in out, out
