"""benchmarks/accelerator.py, the prepared accelerator run: its quick mode runs every section on CPU
(kernels in interpret mode) and writes the table; its compile-only mode compiles the programs for
an H200 with the kernels inside (the full-size programs: README's command, not a test)."""

import os
import pathlib
import re
import subprocess
import sys

from compilers import require_compiler

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator.py"


def test_quick_run_times_every_program_and_writes_one_table(tmp_path):
    out_file = tmp_path / "accelerator.md"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeats", "2", "--out", str(out_file)],
                            cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in out_file.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["kernels"] * 4 + ["decode"] * 3 + ["train"], rows
    for row in rows:
        assert re.search(r"\d\.\d{3} ms, [\d,.]+ (GB/s|TFLOP/s|tok/s)", row), row
    ratios = [r for r in rows if re.search(r"\| \d+\.\d\dx \|$", r)]
    assert len(ratios) == 2, rows  # each baseline row carries the ratio to its kernel
    assert "batch 1 " in rows[4] and "batch 64" in rows[6]


def test_compile_only_puts_the_kernels_in_every_program_for_h200():
    require_compiler("h200:1x1")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the script sets what it needs
    result = subprocess.run([sys.executable, str(SCRIPT), "--compile-only", "h200", "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok ", "FAIL"))]
    assert len(lines) == 8 and all(line.startswith("ok ") for line in lines), result.stdout
    assert "__gpu$xla.gpu.triton" in lines[0] and "ragged_matmul_tgmm" in lines[-1], result.stdout
