"""Compile the training step and serve.py's decode loop for a TPU pod or an H200 node on this (CPU)
machine, and show memory and the Pallas kernels each compiled program contains.

    python -m lite.plan --preset longcat-flash-lite --topology v5p:4x4x8 --mesh fsdp=16,expert=8
    python -m lite.plan --preset longcat-flash-lite --topology h200:4x8 --mesh fsdp=4,expert=8

Uses the real compilers through compile-only devices (sharding.topology): libtpu for TPU topologies
(pip install "jax[tpu]" at the installed jax version), the CUDA PJRT plugin for `h200:HOSTSxGPUS`
(pip install jax-cuda12-plugin and jax-cuda12-pjrt at the installed jax version, or
pip install -e ".[aot]" as .ci/run does). No accelerator is needed. The full training step of
`lite.training.make_train_step` (forward, backward, AdamW update, router-bias update) and the decode
loop serve.py runs (`lite.decode.Generator`'s compiled loop of `LongcatModel.decode_step`, greedy)
are lowered with every parameter, optimizer and cache array placed by `sharding.rules`, compiled,
and `compiled.memory_analysis()` gives the per-device bytes. Run it in
its own process: it points JAX's default device at the topology.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from typing import NamedTuple

from sharding import topology

topology.configure_environment()  # before JAX starts: libtpu and the CUDA plugin read it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from lite.config import PRESETS, get_config  # noqa: E402
from lite.decode import Generation, RowSampling, SamplingMode, generation_programs  # noqa: E402
from lite.model import DecodeCache, abstract_model  # noqa: E402
from lite.params import count_params  # noqa: E402
from lite.training import TrainConfig, make_train_step, peak_flops, plan_state  # noqa: E402
from sharding.expert_parallel import resolve_dispatch  # noqa: E402
from sharding.mesh import make_mesh, parse_mesh_spec  # noqa: E402
from sharding.rules import activation_spec, state_specs  # noqa: E402
from sharding.topology import hbm_bytes, topology_devices  # noqa: E402

COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce")


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


def compile_train_step(cfg, mesh, batch: int, seq_len: int):
    tcfg = TrainConfig(batch_size=batch, seq_len=seq_len, steps=1)
    plan = plan_state(cfg, tcfg)
    graphdef, tx, state = plan.graphdef, plan.tx, plan.abstract()
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


def compile_decode_loop(cfg, mesh, batch: int, cache_len: int, max_new: int = 256):
    """The decode loop serve.py runs: `Generator`'s compiled `lax.while_loop` of `decode_step` and
    greedy sampling (lite.decode.generation_programs), over the model state as `nnx.split` gives it
    (the layers' weights stacked [num_layers, ...], read in place by the unrolled step), with the
    cache and the loop state split over the batch and donated, as the Generator passes them."""
    graphdef, state = nnx.split(abstract_model(cfg))
    state = _abstract(state, state_specs(state, mesh), mesh)
    b = activation_spec("decode_tokens", mesh, (batch,))[0]

    def sds(shape, dtype, spec=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(b) if spec is None else spec))

    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    blocks = tuple(sds((batch, cache_len, row), cfg.jnp_compute_dtype) for _ in range(2 * cfg.num_layers))
    cache = DecodeCache(kv=blocks, lengths=sds((batch,), jnp.int32), ngram=sds((batch, max(cfg.ngram_n - 1, 0)), jnp.int32))
    sampling = RowSampling(temperature=sds((batch,), jnp.float32), top_k=sds((batch,), jnp.int32),
                           top_p=sds((batch,), jnp.float32), key=sds((batch, 2), jnp.uint32))
    row_ints = sds((batch,), jnp.int32)
    gen = Generation(cache=cache, tokens=sds((batch, max_new), jnp.int32), num_tokens=row_ints, last=row_ints,
                     done=sds((batch,), jnp.bool_), reason=row_ints, step=sds((), jnp.int32, P()), sampling=sampling)
    _, decode_loop = generation_programs(graphdef)
    lowered = decode_loop.lower(state, gen, row_ints, sds((), jnp.int32, P()), mode=SamplingMode())
    parts = {"parameters": per_device_bytes(state, mesh), "decode cache": per_device_bytes(cache, mesh)}
    return lowered, parts


def _gib(n: float) -> str:
    return f"{n / 2**30:9.3f} GiB"


class Work(NamedTuple):
    """What one step does, for the compiler's step-time estimate: tokens per chip, and the model
    FLOPs per chip that MFU counts (6 x activated parameters x tokens for a training step, 2 x for
    a forward-only decode step; attention excluded)."""

    tokens_per_chip: float
    model_flops_per_chip: float
    peak_flops: float  # per chip, dense bf16 (lite.training.peak_flops)


def step_work(cfg, tokens: int, chips: int, device, *, training: bool) -> Work:
    activated = count_params(cfg).activated(cfg.target_ffn_experts_per_token)
    per_chip = tokens / chips
    peak, _ = peak_flops(device, TrainConfig())
    return Work(per_chip, (6 if training else 2) * activated * per_chip, peak)


def report(name: str, lowered, parts: dict[str, int], hbm: int, work: Work) -> tuple[list[str], bool]:
    start = time.time()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:  # libtpu refuses programs that exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return [f"{name}: DOES NOT FIT, the compiler says: {str(error).splitlines()[0]}"], False
    seconds = time.time() - start
    memory = compiled.memory_analysis()
    arguments, outputs = memory.argument_size_in_bytes, memory.output_size_in_bytes
    temporaries, aliased = memory.temp_size_in_bytes, memory.alias_size_in_bytes
    code = getattr(memory, "generated_code_size_in_bytes", 0)
    peak = arguments + outputs - aliased + temporaries + code
    hlo = compiled.as_text()
    found = {op: len(re.findall(r"(?<![-\w])" + op + r"(-start)?\(", hlo)) for op in COLLECTIVES}
    collectives = ", ".join(f"{op} x{n}" for op, n in found.items() if n)
    lines = [f"{name} (compiled in {seconds:.0f} s; {collectives or 'no collectives'})",
             f"  {'Pallas kernels':<34}{topology.describe_pallas_calls(hlo)}"]
    lines += [f"  {part:<34}{_gib(size)}" for part, size in parts.items()]
    lines += [f"  {'arguments (all inputs)':<34}{_gib(arguments)}",
              f"  {'outputs not aliased to inputs':<34}{_gib(outputs - aliased)}",
              f"  {'temporaries':<34}{_gib(temporaries)}",
              f"  {'generated code':<34}{_gib(code)}",
              f"  {'peak per device':<34}{_gib(peak)}   of {hbm / 2**30:.0f} GiB HBM: "
              f"{peak / hbm:.0%} {'fits' if peak <= hbm else 'DOES NOT FIT'}",
              *_cost_estimate(compiled, work)]
    return lines, peak <= hbm


def _cost_estimate(compiled, work: Work) -> list[str]:
    """The compiler's own per-chip flops, bytes and step time (libtpu gives them; XLA:GPU's
    cost_analysis needs a GPU client and returns None, or raises, when compiling without one), and
    what the step time would mean: tokens/s per chip and MFU. An estimate, not a measurement; a
    step time that is not positive (libtpu reports negative times it has no model for) is
    reported as unavailable rather than turned into a rate."""
    label = "compiler estimate (not measured)"
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - unimplemented for compile-only GPU devices
        cost = None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    if not cost:
        return [f"  {label:<34}none (this compiler gives no cost analysis without a device)"]
    flops, accessed, seconds = (float(cost.get(key, math.nan)) for key in ("flops", "bytes accessed", "optimal_seconds"))
    known = lambda x: math.isfinite(x) and x >= 0
    lines = [f"  {label:<34}"
             f"{f'{flops:.3g} flop' if known(flops) else 'flops unavailable'}, "
             f"{f'{accessed / 2**30:.3g} GiB accessed' if known(accessed) else 'bytes unavailable'} per chip; "
             f"model {work.model_flops_per_chip:.3g} flop per chip"]
    if math.isfinite(seconds) and seconds > 0:
        mfu = work.model_flops_per_chip / (seconds * work.peak_flops) if math.isfinite(work.peak_flops) else math.nan
        lines.append(f"  {'  step time (estimate)':<34}{seconds * 1e3:.4g} ms: {work.tokens_per_chip / seconds:,.0f} "
                     f"tokens/s per chip, MFU {mfu:.1%} of {work.peak_flops / 1e12:.0f} TFLOP/s")
    else:
        lines.append(f"  {'  step time (estimate)':<34}unavailable (optimal_seconds = {seconds:.3g})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="longcat-flash-lite", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--topology", default="v5p:4x4x8",
                        help="libtpu topology (v5p:4x4x8, v6e:8x8) or H200 hosts x GPUs (h200:1x8, h200:4x8)")
    parser.add_argument("--mesh", default="fsdp=16,expert=8", help="mesh spec over the topology's chips")
    parser.add_argument("--batch", type=int, default=128, help="training rows per step (global)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--decode-batch", type=int, default=256)
    parser.add_argument("--cache-len", type=int, default=4096, help="decode cache length (tokens)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="model config overrides (ints, floats, strings), e.g. num_layers=2, "
                             "expert_dispatch=capacity (auto | capacity | ragged), expert_capacity_factor=1.5, "
                             "ragged_buffer_factor=2 (training only; 0: dropless)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)

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
    try:
        devices = topology_devices(args.topology)
    except topology.TopologyError as error:
        parser.error(str(error))
    topology.set_default_device(devices)  # Pallas lowering asks the default device for the chip
    chips = math.prod(parse_mesh_spec(args.mesh).values())
    if chips != len(devices):
        parser.error(f"--mesh {args.mesh} covers {chips} devices, --topology {args.topology} has {len(devices)}")
    mesh = make_mesh(args.mesh, devices)
    hbm = hbm_bytes(devices[0])
    with jax.set_mesh(mesh):  # `auto` resolves by the platform of the devices compiled for
        dispatch = resolve_dispatch(cfg.expert_dispatch)
    print(f"{cfg.name} on {args.topology}: {len(devices)} x {devices[0].device_kind}, mesh {dict(mesh.shape)}, "
          f"expert dispatch {dispatch} (capacity factor {cfg.expert_capacity_factor:g}, ragged buffer factor "
          f"{cfg.ragged_buffer_factor:g}{'' if cfg.ragged_buffer_factor else ': dropless'}; decode dropless)")

    ok = True
    with jax.set_mesh(mesh):
        if not args.skip_train:
            lowered, parts = compile_train_step(cfg, mesh, args.batch, args.seq_len)
            work = step_work(cfg, args.batch * args.seq_len, len(devices), devices[0], training=True)
            lines, fits = report(f"training step: batch {args.batch} x {args.seq_len} tokens, AdamW",
                                 lowered, parts, hbm, work)
            print("\n".join(lines), flush=True)
            ok &= fits
        if not args.skip_decode:
            lowered, parts = compile_decode_loop(cfg, mesh, args.decode_batch, args.cache_len)
            work = step_work(cfg, args.decode_batch, len(devices), devices[0], training=False)
            lines, fits = report(f"decode loop (serve.py's): batch {args.decode_batch}, cache {args.cache_len} tokens",
                                 lowered, parts, hbm, work)
            print("\n".join(lines), flush=True)
            ok &= fits
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
