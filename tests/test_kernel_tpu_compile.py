"""AOT-compile the TPU kernels with libtpu for two TPU topologies, without a TPU.

Runs `python -m pallas_kernels.tpu_compile_check` in its own process: it points jax's default
device at an abstract TPU device, which must not leak into the other tests.
"""

import importlib.util
import os
import subprocess
import sys


def test_tpu_kernels_compile_for_v5e_and_v6e():
    assert importlib.util.find_spec("libtpu") is not None, "libtpu is missing: pip install -e '.[test]'"
    env = {**os.environ, "JAX_PLATFORMS": ""}
    result = subprocess.run([sys.executable, "-m", "pallas_kernels.tpu_compile_check", "v5e:2x2", "v6e:2x2"],
                            capture_output=True, text=True, env=env, timeout=600)
    report = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert result.returncode == 0 and not any(line.startswith("FAIL") for line in report), (
        result.stdout[-4000:] + result.stderr[-4000:])
    assert len(report) == 14, report  # 7 kernel cases (some with their VJPs) x 2 topologies
    assert sum(" v5e:2x2 " in line for line in report) == sum(" v6e:2x2 " in line for line in report) == 7, report
