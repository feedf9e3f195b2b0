"""Compile the training step and a decode step for a TPU pod on this (CPU) machine, and show memory.

    python -m sharding.plan --preset longcat-flash-lite --topology v5p:4x4x8 --mesh fsdp=16,expert=8

Uses libtpu's compiler through `jax.experimental.topologies.get_topology_desc` (pip install
"jax[tpu]" at the installed jax version): no TPU is needed. The full training step of
`lite.training.make_train_step` (forward, backward, AdamW update, router-bias update) and one
`lite.decode.decode_step` are lowered with every parameter, optimizer and cache array placed by
`sharding.rules`, compiled by the real TPU compiler, and `compiled.memory_analysis()` gives the
per-device bytes. Run it in its own process: it points JAX's default device at the topology.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

# Before JAX loads libtpu: several processes may load it (tests, other tools), and on a machine
# without TPUs these stop libtpu looking for the TPU VM's metadata.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from lite.config import PRESETS, get_config  # noqa: E402
from lite.model import LongcatModel  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from sharding.rules import activation_spec, state_specs  # noqa: E402

# HBM per chip in GiB, by the device kind libtpu reports.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32,
           "TPU v6e": 32, "TPU7x": 192}


COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce")


def hbm_bytes(device) -> int:
    kind = device.device_kind
    for name in sorted(HBM_GIB, key=len, reverse=True):
        if kind.startswith(name):
            return HBM_GIB[name] * 2**30
    raise ValueError(f"unknown HBM size of device kind {kind!r}; known: {sorted(HBM_GIB)}")


def topology_devices(topology: str):
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    return topo.devices


def _abstract(tree, specs, mesh):
    return jax.tree.map(lambda leaf, spec: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                 sharding=NamedSharding(mesh, spec)),
                        tree, specs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def per_device_bytes(tree, mesh) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * leaf.dtype.itemsize
    return total


def abstract_model(cfg, settings):
    from sharding.expert_parallel import set_expert_parallel

    return set_expert_parallel(nnx.eval_shape(lambda: LongcatModel(cfg, rngs=nnx.Rngs(0))), settings)


def compile_train_step(cfg, settings, mesh, batch: int, seq_len: int):
    from lite.training import TrainConfig, TrainState, make_train_step, optimizer

    tcfg = TrainConfig(batch_size=batch, seq_len=seq_len, steps=1)
    graphdef, params, other = nnx.split(abstract_model(cfg, settings), nnx.Param, ...)
    tx = optimizer(tcfg, params)
    state = jax.eval_shape(lambda p, o: TrainState(p, o, tx.init(p), jnp.zeros((), jnp.int32)), params, other)
    state = _abstract(state, state_specs(state, mesh), mesh)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32,
                                  sharding=NamedSharding(mesh, activation_spec("tokens_in", mesh, (batch, seq_len))))
    total_steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    step = make_train_step(graphdef, tx, cfg, tcfg)
    jitted = jax.jit(step, out_shardings=(jax.tree.map(lambda s: s.sharding, state), None), donate_argnums=0)
    lowered = jitted.lower(state, tokens, tokens, total_steps)
    parts = {"parameters": per_device_bytes(state.params, mesh) + per_device_bytes(state.other, mesh),
             "optimizer state": per_device_bytes(state.opt_state, mesh)}
    return lowered, parts


def compile_decode_step(cfg, settings, mesh, batch: int, cache_len: int):
    from lite.decode import DecodeCache, decode_step

    graphdef, state = nnx.split(abstract_model(cfg, settings))
    state = _abstract(state, state_specs(state, mesh), mesh)
    batch_spec = activation_spec("decode_tokens", mesh, (batch,))
    b = batch_spec[0]
    dtype = cfg.jnp_compute_dtype

    def sds(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cache = DecodeCache(
        kv=tuple(sds((batch, cache_len, row), dtype, P(b)) for _ in range(2 * cfg.num_layers)),
        lengths=sds((batch,), jnp.int32, P(b)),
        ngram=sds((batch, max(cfg.ngram_n - 1, 0)), jnp.int32, P(b)))
    tokens = sds((batch,), jnp.int32, P(b))

    def step(state, cache, tokens):
        return decode_step(nnx.merge(graphdef, state), cache, tokens)

    jitted = jax.jit(step, out_shardings=(None, jax.tree.map(lambda s: s.sharding, cache)), donate_argnums=1)
    lowered = jitted.lower(state, cache, tokens)
    parts = {"parameters": per_device_bytes(state, mesh), "decode cache": per_device_bytes(cache, mesh)}
    return lowered, parts


def _gib(n: float) -> str:
    return f"{n / 2**30:9.3f} GiB"


def report(name: str, lowered, parts: dict[str, int], hbm: int) -> tuple[list[str], bool]:
    start = time.time()
    compiled = lowered.compile()
    seconds = time.time() - start
    memory = compiled.memory_analysis()
    arguments, outputs = memory.argument_size_in_bytes, memory.output_size_in_bytes
    temporaries, aliased = memory.temp_size_in_bytes, memory.alias_size_in_bytes
    code = getattr(memory, "generated_code_size_in_bytes", 0)
    peak = arguments + outputs - aliased + temporaries + code
    hlo = compiled.as_text()
    found = {op: len(re.findall(r"(?<![-\w])" + op + r"(-start)?\(", hlo)) for op in COLLECTIVES}
    collectives = ", ".join(f"{op} x{n}" for op, n in found.items() if n)
    lines = [f"{name} (compiled in {seconds:.0f} s; {collectives or 'no collectives'})"]
    lines += [f"  {part:<34}{_gib(size)}" for part, size in parts.items()]
    lines += [f"  {'arguments (all inputs)':<34}{_gib(arguments)}",
              f"  {'outputs not aliased to inputs':<34}{_gib(outputs - aliased)}",
              f"  {'temporaries':<34}{_gib(temporaries)}",
              f"  {'generated code':<34}{_gib(code)}",
              f"  {'peak per device':<34}{_gib(peak)}   of {hbm / 2**30:.0f} GiB HBM: "
              f"{peak / hbm:.0%} {'fits' if peak <= hbm else 'DOES NOT FIT'}"]
    return lines, peak <= hbm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="longcat-flash-lite", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--topology", default="v5p:4x4x8", help="libtpu topology, e.g. v5p:4x4x8, v6e:8x8")
    parser.add_argument("--mesh", default="fsdp=16,expert=8", help="mesh spec over the topology's chips")
    parser.add_argument("--batch", type=int, default=128, help="training rows per step (global)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--decode-batch", type=int, default=256)
    parser.add_argument("--cache-len", type=int, default=4096, help="decode cache length (tokens)")
    parser.add_argument("--dispatch", default="auto", choices=("auto", "capacity", "ragged"))
    parser.add_argument("--capacity-factor", type=float, default=2.0)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="model config overrides (ints, floats, strings), e.g. num_layers=2")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)

    from sharding.expert_parallel import ExpertParallel, resolve_dispatch

    overrides = {}
    for item in args.set:
        key, _, text = item.partition("=")
        for kind in (int, float, str):
            try:
                overrides[key] = kind(text)
                break
            except ValueError:
                continue
    cfg = get_config(args.preset, **overrides)
    devices = topology_devices(args.topology)
    jax.config.update("jax_default_device", devices[0])  # Pallas TPU lowering asks the default device
    mesh = make_mesh(args.mesh, devices)
    hbm = hbm_bytes(devices[0])
    settings = ExpertParallel(dispatch=args.dispatch, capacity_factor=args.capacity_factor)
    print(f"{cfg.name} on {args.topology}: {len(devices)} x {devices[0].device_kind}, mesh {dict(mesh.shape)}, "
          f"expert dispatch {resolve_dispatch(args.dispatch, mesh)} (capacity factor {args.capacity_factor:g})")

    ok = True
    with jax.set_mesh(mesh):
        if not args.skip_train:
            lowered, parts = compile_train_step(cfg, settings, mesh, args.batch, args.seq_len)
            lines, fits = report(f"training step: batch {args.batch} x {args.seq_len} tokens, AdamW",
                                 lowered, parts, hbm)
            print("\n".join(lines), flush=True)
            ok &= fits
        if not args.skip_decode:
            lowered, parts = compile_decode_step(cfg, settings, mesh, args.decode_batch, args.cache_len)
            lines, fits = report(f"decode step: batch {args.decode_batch}, cache {args.cache_len} tokens",
                                 lowered, parts, hbm)
            print("\n".join(lines), flush=True)
            ok &= fits
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
