"""Row-sharded N-gram lookup, forward + backward: window all-gather + masked local gather (hash fused)
+ psum_scatter (what the model uses, sharding.ngram) vs an id all-to-all with dropless fixed-size
buffers, on 8 fake CPU devices, for the demo preset's table at a larger --ngram-vocab-ratio.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/ngram_sharding.py
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lite.config import get_config
from lite.ngram import row_spec
from sharding.mesh import make_mesh
from sharding.ngram import gather_rows


def gather_by_id_all_to_all(table: jax.Array, rows: jax.Array, mesh) -> jax.Array:
    """The alternative: send each id to its row's owner, gather there, send the rows back. Without
    ragged_all_to_all (CPU) the buffers must hold the worst case (every id to one owner) to be exact."""
    axes = tuple(mesh.axis_names)
    devices = mesh.size
    local_rows = table.shape[0] // devices

    def local(table_part, ids):  # [R/n, w], [T, S]
        flat = ids.reshape(-1)
        slots = flat.shape[0]
        owner = flat // local_rows
        order = jnp.argsort(owner, stable=True)
        sizes = jax.ops.segment_sum(jnp.ones_like(owner), owner, num_segments=devices)
        starts = jnp.cumsum(sizes) - sizes
        position = jnp.zeros_like(owner).at[order].set(jnp.arange(slots) - starts[owner[order]])
        dest = owner * slots + position
        send = jnp.full((devices * slots,), -1, jnp.int32).at[dest].set(flat - owner * local_rows)
        recv = jax.lax.all_to_all(send, axes, 0, 0, tiled=True)
        got = jnp.where((recv >= 0)[:, None], jnp.take(table_part, jnp.maximum(recv, 0), axis=0), 0)
        back = jax.lax.all_to_all(got, axes, 0, 0, tiled=True)
        return back[dest].reshape(ids.shape + table.shape[1:])

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes, None), P(axes, None)),
                         out_specs=P(axes, None, None))(table, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ngram-vocab-ratio", type=int, default=64)  # 8x the demo preset's table
    parser.add_argument("--tokens-per-device", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = get_config("demo", ngram_vocab_ratio=args.ngram_vocab_ratio)
    rows, width = cfg.ngram_total_rows, cfg.ngram_table_width
    mesh = make_mesh(f"data={jax.device_count()}")
    n = mesh.size
    rng = np.random.default_rng(0)
    table = jax.device_put(jnp.asarray(rng.normal(size=(rows, width)), jnp.float32),
                           NamedSharding(mesh, P("data", None)))
    windows = jax.device_put(
        jnp.asarray(rng.integers(0, cfg.vocab_size, (n * args.tokens_per_device, cfg.ngram_n)), jnp.int32),
        NamedSharding(mesh, P("data", None)))
    ids = row_spec(cfg).flat_rows(windows, "windows")  # [T, S] flat rows, for the all-to-all
    cotangent = jnp.asarray(rng.normal(size=ids.shape + (width,)), jnp.float32)
    want = np.asarray(table)[np.asarray(ids)]
    print(f"{n} CPU devices, table {rows} x {width} f32 rows split {n} ways, "
          f"{args.tokens_per_device} tokens x {cfg.num_ngram_tables} lookups per device; forward + backward")
    print(f"{'method':<36}{'ms / step':>10}{'ratio':>8}")
    results = {}
    methods = (("window all-gather + psum_scatter", lambda t, mesh: gather_rows(t, row_spec(cfg), mesh, windows=windows)),
               ("id all-to-all, dropless buffers", lambda t, mesh: gather_by_id_all_to_all(t, ids, mesh)))
    for name, fn in methods:
        def loss(t, fn=fn):
            return jnp.sum(fn(t, mesh) * cotangent)

        step = jax.jit(jax.value_and_grad(loss))
        with jax.set_mesh(mesh):
            np.testing.assert_allclose(np.asarray(jax.jit(lambda t, fn=fn: fn(t, mesh))(table)), want)
            jax.block_until_ready(step(table))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(step(table))
                times.append(time.perf_counter() - start)
        results[name] = float(np.median(times)) * 1e3
        base = next(iter(results.values()))
        print(f"{name:<36}{results[name]:>10.1f}{results[name] / base:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
