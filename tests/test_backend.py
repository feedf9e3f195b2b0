"""The one kernel-choice rule (pallas_kernels.backend): by the platform the program is compiled for."""

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from compilers import require_compiler

from pallas_kernels import backend

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cpu_keeps_xla_under_auto_and_interprets_pallas():
    assert backend.target_platform() == "cpu"
    assert [backend.choose("ngram_gather", i) for i in ("auto", "pallas", "xla")] == ["xla", "interpret", "xla"]
    # The grouped matmul's CPU form is the tiled XLA one (ragged_dot does g times the work there).
    assert [backend.choose("ragged_matmul", i) for i in ("auto", "pallas", "xla")] == ["xla-tiled", "interpret", "xla"]
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert backend.choose("ngram_gather", "auto") == "xla"
    with pytest.raises(ValueError, match="unknown ngram_gather implementation 'cuda'"):
        backend.choose("ngram_gather", "cuda")
    with pytest.raises(ValueError, match="unknown op 'gather'"):
        backend.choose("gather", "auto")


def test_forced_changes_auto_only_and_is_undone_on_exit():
    with backend.forced("gpu-interpret"):
        assert backend.choose("ngram_gather", "auto") == "gpu-interpret"
        assert backend.choose("ngram_gather", "xla") == "xla"  # an explicit choice stays explicit
        with backend.forced("interpret"):
            assert backend.choose("ngram_gather", "auto") == "interpret"
        assert backend.choose("ngram_gather", "auto") == "gpu-interpret"
    assert backend.choose("ngram_gather", "auto") == "xla"
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        with backend.forced("cuda"):
            pass


CHILD = """
import sys
from sharding import topology
topology.configure_environment()
import jax
from pallas_kernels import backend
devices = topology.topology_devices(sys.argv[1])
before = backend.choose("ngram_gather", "auto")
mesh = jax.sharding.Mesh(devices, ("data",))
with jax.set_mesh(mesh):  # the ambient mesh's devices decide, even with the default device on CPU
    in_mesh = backend.choose("ngram_gather", "auto")
topology.set_default_device(devices)
print(before, in_mesh, backend.choose("ngram_gather", "auto"), backend.choose("ngram_gather", "pallas"))
"""


@pytest.mark.parametrize("spec,kernel", [("v5e:2x2", "tpu"), ("h200:1x8", "gpu")])
def test_compile_only_accelerator_devices_get_their_kernels(spec, kernel):
    """On this CPU machine, a mesh over (or the default device set to) compile-only TPU / H200
    devices chooses the accelerator's kernels, though jax.default_backend() stays "cpu"."""
    require_compiler(spec)
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", CHILD, spec], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.split()[-4:] == ["xla", kernel, kernel, kernel], out.stdout
