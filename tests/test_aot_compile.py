"""The accelerator program compiled whole, without the accelerator: `lite.plan` compiles the
training step and a decode step of a small model with expert parallelism for an 8-chip TPU v5p
slice (libtpu) and for one 8 x H200 node (the CUDA plugin), and the compiled programs must contain
the Pallas kernels: a compile that quietly fell back to XLA code fails here.

Each compile runs in its own process: the tools point JAX's default device at the target, set
environment variables before JAX starts, and Mosaic GPU caches kernels per process ignoring the
target. Without libtpu / the CUDA plugin these tests skip, or fail under LONGCAT_REQUIRE_AOT=1
(.ci/run sets it and installs both: pip install -e ".[aot]").
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from compilers import require_compiler
from sharding import topology

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What the tools must set up themselves: removed from the children's environment.
TOOL_ENV = ("JAX_PLATFORMS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_ACCELERATOR_TYPE",
            "TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY")
# The tiny preset with 8 experts (2 per device on expert=4), the training step's ragged receive
# buffers bounded at twice the balanced load; 8 rows of 32 tokens; cache of 32.
SMALL_MODEL = ["--preset", "tiny", "--set", "n_routed_experts=8", "ragged_buffer_factor=2", "--batch", "8", "--seq-len", "32",
               "--decode-batch", "8", "--cache-len", "32"]
GPU_CALL_TARGETS = {"__gpu$xla.gpu.triton", "mosaic_gpu_v2", "mosaic_gpu"}


def _run(args: list[str], timeout: int = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in TOOL_ENV}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return result.stdout


def _plan(spec: str, mesh: str) -> tuple[str, str, str]:
    """-> (header line, training step section, decode loop section) of lite.plan's report."""
    out = _run(["-m", "lite.plan", *SMALL_MODEL, "--topology", spec, "--mesh", mesh])
    header, rest = out.split("\ntraining step", 1)
    train, decode = rest.split("\ndecode loop", 1)
    return header, train, decode


def _pallas_line(section: str) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """Parse `Pallas kernels  a x6 (3 backward), b x1; 7 calls to T` ->
    ({name: (calls, backward calls)}, {custom-call targets})."""
    line = re.search(r"Pallas kernels\s+(.*)", section)
    assert line, section
    kernels, _, targets = line[1].partition("; ")
    found = {m[1]: (int(m[2]), int(m[3] or 0)) for m in re.finditer(r"(\w+) x(\d+)(?: \((\d+) backward\))?", kernels)}
    return found, set(re.sub(r"^\d+ calls? to ", "", targets).split(" and ")) if targets else set()


def _check_plan(spec: str, mesh: str, device: str, hbm_gib: float, call_targets: set[str]) -> None:
    header, train, decode = _plan(spec, mesh)
    assert f"8 x {device}" in header and "expert dispatch ragged" in header, header
    for section in (train, decode):
        assert "ragged-all-to-all x" in section, section  # the dropless dispatch, as accelerators run it
        peak = float(section.split("peak per device")[1].split("GiB")[0])
        assert 0 < peak < hbm_gib and "fits" in section, section
        assert "compiler estimate (not measured)" in section, section
        # libtpu gives a cost analysis (its step time may be "unavailable"); XLA:GPU gives none without a GPU.
        assert ("step time (estimate)" in section) == device.startswith("TPU"), section

    kernels, targets = _pallas_line(train)
    assert kernels, f"the training step compiled without any Pallas kernel (all XLA):\n{train}"
    assert targets <= call_targets, f"Pallas calls {targets} are not the target's {call_targets}:\n{train}"
    gmm, gmm_backward = kernels.get("ragged_matmul_gmm", (0, 0))
    assert gmm - gmm_backward >= 1, f"no forward expert matmul kernel in the training step:\n{train}"
    assert gmm_backward >= 1, f"no input-gradient expert matmul kernel in the training step:\n{train}"
    tgmm, tgmm_backward = kernels.get("ragged_matmul_tgmm", (0, 0))
    assert tgmm >= 1 and tgmm_backward == tgmm, f"no weight-gradient kernel in the training step:\n{train}"
    assert kernels.get("ngram_gather", (0, 0))[0] >= 1, f"no N-gram gather kernel in the training step:\n{train}"

    kernels, targets = _pallas_line(decode)
    assert kernels, f"the decode step compiled without any Pallas kernel (all XLA):\n{decode}"
    assert targets <= call_targets, f"Pallas calls {targets} are not the target's {call_targets}:\n{decode}"
    assert kernels.get("ngram_gather", (0, 0))[0] >= 1, f"no N-gram gather kernel in the decode step:\n{decode}"
    assert kernels.get("ragged_matmul_gmm", (0, 0))[0] >= 1, f"no expert matmul kernel in the decode step:\n{decode}"
    assert "ragged_matmul_tgmm" not in kernels and not any(b for _, b in kernels.values()), decode


def test_plan_compiles_train_and_decode_steps_for_a_tpu_pod():
    """v5p:2x2x2 (8 chips), data=2 x expert=4: Mosaic TPU kernels, compiled by libtpu."""
    require_compiler("v5p:2x2x2")
    _check_plan("v5p:2x2x2", "data=2,expert=4", "TPU v5", 95, {"tpu_custom_call"})


def test_plan_compiles_train_and_decode_steps_for_an_h200_node():
    """h200:1x8 (one host, 8 GPUs), data=2 x expert=4: Pallas GPU kernels, compiled to sm_90a."""
    require_compiler("h200:1x8")
    _check_plan("h200:1x8", "data=2,expert=4", "NVIDIA H200", 140.5, GPU_CALL_TARGETS)


@pytest.mark.parametrize("spec", ["v5e:2x2", "h200:4x8"])
def test_topology_self_check_counts_a_hand_made_kernel_pair(spec):
    """The compiler plugin works and pallas_kernel_calls reads its HLO: a named forward kernel and
    its backward (under jax.grad) come back by name, whatever the model's kernels do."""
    require_compiler(spec)
    out = _run(["-m", "sharding.topology", spec], timeout=300)
    assert "self-check ok" in out and "selfcheck_forward x1" in out and "selfcheck_backward x1 (1 backward)" in out, out
    expected = "4 x TPU v5 lite on 1 host(s)" if spec.startswith("v5e") else "32 x NVIDIA H200 on 4 host(s)"
    assert expected in out, out


# HLO lines as the compilers print them (kernel bodies cut short), for the parser without compilers.
TPU_LINE = ('  %%transpose_jvp_k__.1 = f32[128,128]{1,0:T(8,128)} custom-call(%%x), '
            'custom_call_target="tpu_custom_call", '
            'metadata={op_name="jit(f)/transpose(jvp(%s))/pallas_call" stack_frame_id=3}, '
            'backend_config={"custom_call_config":{"body":"TUzvUgFNTElS","needs_layout_passes":true}}')
TPU_NESTED = ('  ROOT %%ragged_matmul_gmm.3 = bf16[64,32]{1,0} custom-call(%%a, %%b), '
              'custom_call_target="tpu_custom_call", '
              'metadata={op_name="jit(step)/jvp()/while/body/shard_map/jit(gmm)/%s/pallas_call"}, backend_config={}')
TRITON_LINE = ('  %%pallas_call.3 = f32[16,16]{1,0} custom-call(%%x.1), custom_call_target="__gpu$xla.gpu.triton", '
               'api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(f)/%s/pallas_call" '
               'scheduling_name="pallas_call.3"}, backend_config={debug = false, grid_x = 1 : i32, '
               'ir = "ML\\EFR\\0DMLIR", name = "%s", num_stages = 3 : i32}')
MOSAIC_GPU_LINE = ('  %%pallas_call.4 = f32[128,128]{1,0} custom-call(%%x), custom_call_target="mosaic_gpu_v2", '
                   'metadata={op_name="jit(f)/%s/pallas_call" scheduling_name="pallas_call.4"}, '
                   'backend_config={kernel_hash = "\\84", module = "ML\\EFR"}')


def test_kernel_counts_read_tpu_triton_and_mosaic_gpu_hlo():
    """Names from each compiler's HLO (Triton: the backend config's name wins over op_name); calls
    to other custom-call targets and ops that merely carry a kernel's op_name are not counted."""
    text = "\n".join([
        TPU_LINE % "ngram_gather", TPU_NESTED % "ragged_matmul_gmm", TRITON_LINE % ("a", "ragged_matmul_tgmm"),
        MOSAIC_GPU_LINE % "ragged_matmul_gmm", '  %f = f32[4]{0} custom-call(%x), custom_call_target="Sharding"',
        '  %c = f32[4]{0} add(%x, %x), metadata={op_name="jit(f)/ngram_gather/pallas_call"}'])
    assert topology.pallas_kernel_counts(text) == {
        "ngram_gather": 1, "ragged_matmul_gmm": 2, "ragged_matmul_tgmm": 1, "total": 4}
    calls = topology.pallas_kernel_calls(text)
    assert [c.backward for c in calls] == [True, False, False, False]
    assert topology.describe_pallas_calls(text) == (
        "ngram_gather x1 (1 backward), ragged_matmul_gmm x2, ragged_matmul_tgmm x1; 4 calls to "
        "__gpu$xla.gpu.triton and mosaic_gpu_v2 and tpu_custom_call")
    assert topology.pallas_kernel_counts("  %d = f32[2]{0} dot(%a, %b)") == {"total": 0}
    assert topology.describe_pallas_calls("") == "none"


class FakeDevice:
    def __init__(self, kind):
        self.device_kind = kind


def test_target_specs_hbm_and_the_h200_description_ships_with_the_package():
    assert topology.parse_target("h200:4x8") == topology.Target("h200:4x8", "gpu", "h200", 4, 8)
    assert topology.parse_target("v5p:4x4x8").platform == "tpu"
    for bad in ("h200:8", "h200:0x8", "h200", "v5p"):
        with pytest.raises(topology.TopologyError):
            topology.parse_target(bad)
    assert topology.hbm_bytes(FakeDevice("NVIDIA H200")) == 150754820096 == 143771 * 2**20
    assert topology.hbm_bytes(FakeDevice("TPU v5 lite")) == 16 * 2**30
    assert topology.hbm_bytes(FakeDevice("TPU v5")) == 95 * 2**30
    config = topology.gpu_target_config("h200")
    assert "core_count: 132" in config and "memory_bandwidth: 4800000000000" in config
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "targets/*.txtpb" in pyproject["tool"]["setuptools"]["package-data"]["sharding"]
