"""Compile every TPU kernel for real TPU topologies without a TPU: `python -m pallas_kernels.tpu_compile_check [TOPOLOGY ...]`.

Needs libtpu matching jax (`pip install "jax[tpu]"`). Runs the real Mosaic compiler, so layout,
alignment and VMEM errors that interpret mode cannot see show up here. It sets the default device
to an abstract TPU device, so run it in its own process (the test does).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # silences a harmless libtpu start-up warning
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from pallas_kernels.ngram_gather import RowSpec, kernel_ngram_gather  # noqa: E402
from pallas_kernels.ragged_matmul import kernel_ragged_matmul  # noqa: E402

TOPOLOGIES = ("v5e:2x2", "v6e:2x2")  # more on the command line, e.g. v5p:2x2x1

# The N-gram tables of two presets (lite.ngram.row_spec; V_s = ratio * V0 + 2s + 1), with their row widths.
DEMO = RowSpec(vocab_size=4096, window=3, table_sizes=(32769, 32771, 32773, 32775), table_orders=(2, 2, 3, 3))
DEMO_WIDTH = 64
# The released model's layout at ngram_vocab_ratio 1: 12 sub-tables of width 256, orders 2, 3, 4.
LITE = RowSpec(vocab_size=131072, window=4, table_sizes=tuple(131072 + 2 * s + 1 for s in range(12)),
               table_orders=(2,) * 4 + (3,) * 4 + (4,) * 4)
LITE_WIDTH = 256


def cases():
    """(name, function, argument shapes): each kernel with its gradient (which compiles its forward
    too), at small aligned and ragged shapes (k and n not multiples of the tile)."""
    i32, bf16 = jnp.int32, jnp.bfloat16
    s = jax.ShapeDtypeStruct
    for m, k, n, g in ((512, 768, 256, 8), (384, 320, 200, 4)):
        def matmul_loss(lhs, rhs, sizes, offset):
            out = kernel_ragged_matmul(lhs, rhs, sizes, offset, "tpu", (128, 256, 128))
            return jnp.sum(out.astype(jnp.float32) ** 2)
        shapes = (s((m, k), bf16), s((g, k, n), bf16), s((g,), i32), s((), i32))
        yield f"ragged_matmul vjp m={m} k={k} n={n} g={g}", jax.grad(matmul_loss, argnums=(0, 1)), shapes
    for key_kind in ("windows", "ids"):
        def gather_loss(table, keys, key_kind=key_kind):
            rows = kernel_ngram_gather(table, keys, DEMO, key_kind, backend="tpu")
            return jnp.sum(rows.astype(jnp.float32) ** 2)
        for dtype in (jnp.float32, bf16):  # bf16: row pairs (ngram_gather/tpu.py)
            shapes = (s((DEMO.total_rows, DEMO_WIDTH), dtype), s((1000, DEMO.num_keys(key_kind)), i32))
            name = f"ngram_gather {key_kind} {jnp.dtype(dtype).name}"
            # The VJP is XLA code shared by both keys; XLA:TPU takes minutes over it with the hash
            # inside, so the hashing kernel compiles forward only.
            yield (f"{name} vjp", jax.grad(gather_loss), shapes) if key_kind == "ids" else (f"{name} fwd", gather_loss, shapes)
    # A bf16 table of the released layout (0.8 GB): its temp size shows that no copy of the table is
    # made (the demo's 64-wide table is relaid out on v5p, where XLA stores such a narrow parameter
    # transposed).
    def lite_rows(table, windows):
        return kernel_ngram_gather(table, windows, LITE, "windows", backend="tpu")
    shapes = (s((LITE.total_rows, LITE_WIDTH), bf16), s((4096, LITE.window), i32))
    yield "ngram_gather windows bfloat16 fwd, 12 x 256 wide", lite_rows, shapes


def main() -> int:
    failures = 0
    for topology in sys.argv[1:] or TOPOLOGIES:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
        device = topo.devices[0]
        jax.config.update("jax_default_device", device)  # Pallas TPU lowering asks the default device
        sharding = jax.sharding.SingleDeviceSharding(device)
        for name, fn, shapes in cases():
            args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in shapes]
            begin = time.perf_counter()
            try:
                compiled = jax.jit(fn).lower(*args).compile()
                memory = compiled.memory_analysis()
                temp = getattr(memory, "temp_size_in_bytes", 0) if memory is not None else 0
                print(f"ok   {device.device_kind:>12} {topology:>10}  {name}  (temp {temp / 2**20:.1f} MiB, {time.perf_counter() - begin:.1f} s)")
            except Exception as error:  # report every case, then fail
                failures += 1
                print(f"FAIL {device.device_kind:>12} {topology:>10}  {name}: {type(error).__name__}: "
                      f"{str(error)[:2000]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
