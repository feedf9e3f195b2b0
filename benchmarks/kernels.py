"""Kernel benchmarks, ours against the XLA baseline in one run: `python benchmarks/kernels.py`.

On a GPU or TPU: the N-gram gather at 8192 and 65536 tokens x 12 sub-tables x 256 (bf16, the table
as large as --table-gb allows) in GB/s next to the device's copy bandwidth measured in the same run,
and the grouped matmul at m = 4096 and 65536, k = 3072, n = 2048, g = 256 (random group sizes) in
TFLOP/s next to jax.lax.ragged_dot, a dense matmul of equal FLOPs and, on Hopper, the Mosaic-GPU
ragged_dot that ships inside jax. On CPU: tiny shapes with the kernels in interpret mode, only to
show the script works (interpret-mode times mean nothing). Needs only jax, numpy and this repo.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lite.config import get_config
from lite.ngram import ngram_windows, row_spec
from pallas_kernels.ngram_gather import kernel_ngram_gather, ngram_gather
from pallas_kernels.ragged_matmul import kernel_ragged_matmul, ragged_matmul_reference
from pallas_kernels.ragged_matmul.xla_tiled import tiled_ragged_matmul


def timed(fn, *args, repeats: int) -> float:
    """Median seconds per call of a jitted fn (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def kernel_backend() -> str:
    platform = jax.default_backend()
    return platform if platform in ("tpu", "gpu") else "interpret"


def copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    seconds = timed(jax.jit(lambda x: x * 1.0 + 0.0), x, repeats=repeats)  # one read, one write
    return 2 * x.nbytes / seconds / 1e9


def hashed_table(rows: int, width: int, dtype) -> jax.Array:
    """A [rows, width] table of values in [-1, 1) from an integer hash of (row, column): one fused
    elementwise pass. jax.random.normal at 16 GB needs about 120 GB of temporaries (threefry)."""

    @jax.jit
    def make():
        row = jax.lax.broadcasted_iota(jnp.uint32, (rows, width), 0)
        col = jax.lax.broadcasted_iota(jnp.uint32, (rows, width), 1)
        h = row * jnp.uint32(0x9E3779B1) + col * jnp.uint32(0x85EBCA77)
        h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
        h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
        h = h ^ (h >> 16)
        return ((h >> 8).astype(jnp.float32) * (2.0 / (1 << 24)) - 1.0).astype(dtype)

    return make()


def ngram_rows(args, backend):
    """(tokens, table_gb): bf16, 12 sub-tables x 256 wide at the released vocabulary, ratio sized to fit."""
    if backend == "interpret":
        return [(256, None)], get_config("tiny")
    base = get_config("longcat-flash-lite")
    per_unit = base.num_ngram_tables * base.vocab_size * base.ngram_table_width * 2  # bytes per unit of ratio
    ratio = max(1, min(base.ngram_vocab_ratio, int(args.table_gb * 1e9 // per_unit)))
    return [(8192, None), (65536, None)], base.replace(ngram_vocab_ratio=ratio)


def bench_ngram(args, backend, rows_out):
    sizes, cfg = ngram_rows(args, backend)
    dtype = jnp.bfloat16  # the released model's table dtype
    table = hashed_table(cfg.ngram_total_rows, cfg.ngram_table_width, dtype)
    copy = copy_bandwidth(min(table.nbytes, 2 << 30), args.repeats)
    for tokens, _ in sizes:
        ids = jax.random.randint(jax.random.key(1), (1, tokens), 0, cfg.vocab_size, jnp.int32)
        windows = ngram_windows(ids, cfg).reshape(tokens, cfg.ngram_n)
        moved = 2 * tokens * cfg.num_ngram_tables * cfg.ngram_table_width * table.dtype.itemsize  # read + write
        ours = jax.jit(lambda t, w: kernel_ngram_gather(t, w, row_spec(cfg), "windows", backend=backend))
        xla = jax.jit(lambda t, w: ngram_gather(t, row_spec(cfg), windows=w, implementation="xla"))
        np.testing.assert_array_equal(np.asarray(ours(table, windows)), np.asarray(xla(table, windows)))
        t_ours, t_xla = timed(ours, table, windows, repeats=args.repeats), timed(xla, table, windows, repeats=args.repeats)
        shape = (f"T={tokens} S={cfg.num_ngram_tables} w={cfg.ngram_table_width} {jnp.dtype(dtype).name}, "
                 f"table {table.nbytes / 1e9:.2f} GB")
        rows_out.append(("ngram gather (hash fused)", shape, f"{backend} kernel", t_ours, f"{moved / t_ours / 1e9:.1f} GB/s",
                         f"{t_xla / t_ours:.2f}x XLA take; {moved / t_ours / 1e9 / copy:.0%} of copy {copy:.0f} GB/s"))
        rows_out.append(("ngram gather (hash fused)", shape, "XLA hash + jnp.take", t_xla,
                         f"{moved / t_xla / 1e9:.1f} GB/s", f"{moved / t_xla / 1e9 / copy:.0%} of copy"))


def random_group_sizes(m: int, g: int, seed: int) -> jax.Array:
    counts = np.random.default_rng(seed).multinomial(m, np.random.default_rng(seed + 1).dirichlet(np.ones(g)))
    return jnp.asarray(counts, jnp.int32)


def bench_matmul(args, backend, rows_out):
    if backend == "interpret":
        shapes, dtype = [(256, 128, 128, 8)], jnp.float32
    else:
        shapes, dtype = [(4096, 3072, 2048, 256), (65536, 3072, 2048, 256)], jnp.bfloat16
    for m, k, n, g in shapes:
        keys = jax.random.split(jax.random.key(2), 2)
        lhs = jax.random.normal(keys[0], (m, k), dtype)
        rhs = (jax.random.normal(keys[1], (g, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
        sizes = random_group_sizes(m, g, seed=m)
        flops = 2 * m * k * n
        ours = jax.jit(lambda a, b, s: kernel_ragged_matmul(a, b, s, jnp.int32(0), backend, None))
        xla = jax.jit(ragged_matmul_reference)
        dense = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
        got = np.asarray(ours(lhs, rhs, sizes), np.float32)
        try:  # XLA may expand ragged_dot densely (g x the work and memory): report a failure, keep going
            want = np.asarray(xla(lhs, rhs, sizes), np.float32)
        except Exception as error:
            print(f"jax.lax.ragged_dot failed at m={m}: {type(error).__name__}: {str(error)[:300]}")
            want = None
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2)
        t_ours = timed(ours, lhs, rhs, sizes, repeats=args.repeats)
        t_xla = timed(xla, lhs, rhs, sizes, repeats=args.repeats) if want is not None else float("nan")
        t_dense = timed(dense, lhs, rhs[0], repeats=args.repeats)
        shape = f"m={m} k={k} n={n} g={g} {jnp.dtype(dtype).name}"
        rate = lambda t: f"{flops / t / 1e12:.2f} TFLOP/s"  # noqa: E731
        vs_xla = f"{t_xla / t_ours:.2f}x ragged_dot" if want is not None else "ragged_dot failed"
        rows_out.append(("grouped matmul", shape, f"{backend} kernel", t_ours, rate(t_ours),
                         f"{vs_xla}; {t_dense / t_ours:.0%} of dense"))
        rows_out.append(("grouped matmul", shape, "jax.lax.ragged_dot", t_xla, rate(t_xla), ""))
        rows_out.append(("grouped matmul", shape, "dense matmul, same FLOPs", t_dense, rate(t_dense), ""))
        mgpu = mosaic_gpu_ragged_dot(lhs, rhs, sizes)
        if mgpu is not None:
            t_mgpu = timed(mgpu, lhs, rhs, sizes, repeats=args.repeats)
            rows_out.append(("grouped matmul", shape, "Mosaic-GPU ragged_dot (jax)", t_mgpu, rate(t_mgpu),
                             f"ours {t_mgpu / t_ours:.2f}x of it"))


def mosaic_gpu_ragged_dot(lhs, rhs, sizes):
    """jax's Hopper ragged_dot (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu), or None where it cannot run."""
    device = jax.devices()[0]
    if device.platform != "gpu" or "H100" not in device.device_kind and "H200" not in device.device_kind:
        return None
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

        fn = jax.jit(lambda a, b, s: ragged_dot_mgpu.ragged_dot(a, b, group_sizes=s, block_m=128, block_n=128,
                                                                 block_k=64, max_concurrent_steps=4, grid_block_n=1))
        jax.block_until_ready(fn(lhs, rhs, sizes))
        return fn
    except Exception as error:  # an upstream example kernel: report, do not fail the run
        print(f"Mosaic-GPU ragged_dot unavailable: {type(error).__name__}: {str(error)[:200]}")
        return None


def bench_tiled_xla(args, rows_out):
    """What `auto` runs on CPU (xla_tiled.py) against ragged_dot, at the demo preset's MoE shape
    (batch 8 x 256 tokens, top-3: m = 6144 rows, D = 256, expert width 256, 8 experts)."""
    m, k, n, g = 6144, 256, 256, 8
    keys = jax.random.split(jax.random.key(3), 2)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32)
    rhs = jax.random.normal(keys[1], (g, k, n), jnp.float32) / np.sqrt(k)
    sizes = random_group_sizes(m, g, seed=m)
    tiled, xla = jax.jit(tiled_ragged_matmul), jax.jit(ragged_matmul_reference)
    np.testing.assert_allclose(np.asarray(tiled(lhs, rhs, sizes)), np.asarray(xla(lhs, rhs, sizes)),
                               rtol=1e-4, atol=1e-4)
    t_tiled = timed(tiled, lhs, rhs, sizes, repeats=args.repeats)
    t_xla = timed(xla, lhs, rhs, sizes, repeats=args.repeats)
    shape = f"m={m} k={k} n={n} g={g} float32"
    rate = lambda t: f"{2 * m * k * n / t / 1e9:.1f} GFLOP/s"  # noqa: E731
    rows_out.append(("grouped matmul", shape, "tiled XLA (auto on CPU)", t_tiled, rate(t_tiled),
                     f"{t_xla / t_tiled:.2f}x ragged_dot"))
    rows_out.append(("grouped matmul", shape, "jax.lax.ragged_dot", t_xla, rate(t_xla), ""))
    # Forward and backward (d lhs, d rhs: three products' work), as a training step runs it.
    cotangent = jax.random.normal(jax.random.key(4), (m, n), jnp.float32)
    tiled_grad, xla_grad = (jax.jit(jax.grad(lambda a, b, f=f: jnp.sum(f(a, b, sizes) * cotangent), (0, 1)))
                            for f in (tiled_ragged_matmul, ragged_matmul_reference))
    t_tiled, t_xla = (timed(f, lhs, rhs, repeats=args.repeats) for f in (tiled_grad, xla_grad))
    rate3 = lambda t: f"{6 * m * k * n / t / 1e9:.1f} GFLOP/s"  # noqa: E731
    rows_out.append(("grouped matmul, fwd + bwd", shape, "tiled XLA (auto on CPU)", t_tiled, rate3(t_tiled),
                     f"{t_xla / t_tiled:.2f}x ragged_dot"))
    rows_out.append(("grouped matmul, fwd + bwd", shape, "jax.lax.ragged_dot", t_xla, rate3(t_xla), ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--table-gb", type=float, default=16.0, help="N-gram table size on accelerators")
    parser.add_argument("--only", choices=("ngram", "matmul"), default=None)
    args = parser.parse_args()
    backend = kernel_backend()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, kernels: {backend}")
    rows = []
    if args.only in (None, "ngram"):
        bench_ngram(args, backend, rows)
    if args.only in (None, "matmul"):
        bench_matmul(args, backend, rows)
        if jax.default_backend() == "cpu":
            bench_tiled_xla(args, rows)
    print("\n| op | shape | implementation | ms | rate | vs baseline |\n| --- | --- | --- | ---: | ---: | --- |")
    for op, shape, impl, seconds, rate, note in rows:
        print(f"| {op} | {shape} | {impl} | {seconds * 1e3:.3f} | {rate} | {note} |")


if __name__ == "__main__":
    main()
