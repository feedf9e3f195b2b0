"""One prepared accelerator run: kernels, decoding and training steps as one markdown table.

    python benchmarks/accelerator.py                       # on one GPU or TPU: under 8 minutes on an H200
    python benchmarks/accelerator.py --compile-only h200   # on a CPU machine: compile every program for H200
    python benchmarks/accelerator.py --quick               # tiny shapes, kernels in interpret mode (CPU smoke)

Programs, each timed as the median of --repeats calls after a warm-up, ours next to a baseline where
one exists (ratio in the last column):
  kernels   the N-gram gather (hash fused) vs XLA's hash + jnp.take, at the released layout (bf16,
            12 sub-tables x 256) with a ~4 GB table; the grouped matmul kernel vs jax.lax.ragged_dot
  decode    one decode step of the demo preset (bf16) at batch 1 / 8 / 64 with a 1024-token cache
  train     the full training step (lite.training.make_train_step: forward, backward, AdamW) of the
            demo preset and of `lite-2l` (LongCat-Flash-Lite's layer shapes with 2 layers, 32 FFN
            experts and a 1x-vocabulary N-gram table), tokens/s and MFU = 6 x activated parameters
            x tokens / time / the device's bf16 dense peak (lite.training.peak_flops: 989 TFLOP/s on H200)
Each program's failure (compile or run) becomes its table row instead of ending the run, and a
program that would start after --budget-s is reported as skipped. `--compile-only TARGET` builds the
same programs with abstract arguments and compiles them for a compile-only device
(sharding.topology: `h200` = one H200 through the CUDA plugin, or any TPU spec such as `v5e:1x1`),
printing the Pallas kernels each contains; it fails if one does not compile or has no kernel.
Needs jax, flax, optax and this repo (not grain), so it runs on the lent H200 machine as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from typing import Callable

COMPILE_ONLY = "--compile-only" in sys.argv
if COMPILE_ONLY:  # before JAX starts: the compile-only plugins need JAX_PLATFORMS=cpu and libtpu settings
    from sharding import topology

    topology.configure_environment()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lite.config import get_config  # noqa: E402
from lite.model import DecodeCache, LongcatModel, abstract_model  # noqa: E402
from lite.ngram import row_spec  # noqa: E402
from lite.training import TrainConfig, flops_per_token, make_train_step, peak_flops, plan_state  # noqa: E402
from pallas_kernels import backend as kernel_backend  # noqa: E402
from pallas_kernels.ngram_gather import kernel_ngram_gather, ngram_gather  # noqa: E402
from pallas_kernels.ragged_matmul import kernel_ragged_matmul, ragged_matmul_reference  # noqa: E402

from kernels import hashed_table, timed  # noqa: E402  (benchmarks/kernels.py: this script's folder is on sys.path)



@dataclasses.dataclass
class Program:
    section: str
    name: str
    shape: str
    fn: Callable  # jitted
    abstract: Callable[[], tuple]  # -> jax.ShapeDtypeStruct pytree of the arguments
    make: Callable[[], tuple]  # -> the real arguments (on the default device)
    rate: Callable[[float], str]  # seconds per call -> "x GB/s" / "x tok/s, MFU y%"
    baseline_of: str | None = None  # the name of the program this one is the baseline of
    needs_kernels: bool = True  # compile-only: must contain Pallas kernels


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def filled(shape, dtype) -> jax.Array:
    """benchmarks/kernels.py's hashed fill (no RNG temporaries) in any shape."""
    return hashed_table(int(np.prod(shape[:-1])), shape[-1], dtype).reshape(shape)


def integers(shape, high: int, seed: int = 1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


# ---------------------------------------------------------------------------------------------
# Kernels.

def kernel_programs(quick: bool, backend: str) -> list[Program]:
    if quick:
        cfg, tokens, (m, k, n, g) = get_config("tiny"), 256, (256, 128, 128, 8)
    else:  # the released layout; a ~4 GB table (ratio 5) so that rows do not sit in L2
        cfg, tokens, (m, k, n, g) = get_config("longcat-flash-lite", ngram_vocab_ratio=5), 65536, (16384, 3072, 1024, 64)
    table_shape, dtype = (cfg.ngram_total_rows, cfg.ngram_table_width), jnp.bfloat16
    moved = 2 * tokens * cfg.num_ngram_tables * cfg.ngram_table_width * 2  # rows read + written, bytes
    gather_args = (lambda: (sds(table_shape, dtype), sds((tokens, cfg.ngram_n), jnp.int32)),
                   lambda: (filled(table_shape, dtype), integers((tokens, cfg.ngram_n), cfg.vocab_size)))
    gb_s = lambda s: f"{moved / s / 1e9:.1f} GB/s"  # noqa: E731
    shape = f"T={tokens} S={cfg.num_ngram_tables} w={cfg.ngram_table_width} bf16, table {np.prod(table_shape) * 2 / 1e9:.1f} GB"
    sizes = np.random.default_rng(2).multinomial(m, np.ones(g) / g).astype(np.int32)
    matmul_args = (lambda: (sds((m, k), dtype), sds((g, k, n), dtype), sds((g,), jnp.int32)),
                   lambda: (filled((m, k), dtype), filled((g, k, n), dtype), jnp.asarray(sizes)))
    tflops = lambda s: f"{2 * m * k * n / s / 1e12:.1f} TFLOP/s"  # noqa: E731
    matmul_shape = f"m={m} k={k} n={n} g={g} bf16"
    return [
        Program("kernels", "ngram gather, hash fused (kernel)", shape,
                jax.jit(lambda t, w: kernel_ngram_gather(t, w, row_spec(cfg), "windows", backend=backend)), *gather_args, gb_s),
        Program("kernels", "ngram gather, XLA hash + take", shape,
                jax.jit(lambda t, w: ngram_gather(t, row_spec(cfg), windows=w, implementation="xla")), *gather_args, gb_s,
                baseline_of="ngram gather, hash fused (kernel)", needs_kernels=False),
        Program("kernels", "grouped matmul (kernel)", matmul_shape,
                jax.jit(lambda a, b, s: kernel_ragged_matmul(a, b, s, jnp.int32(0), backend, None)), *matmul_args,
                tflops),
        Program("kernels", "grouped matmul, jax.lax.ragged_dot", matmul_shape,
                jax.jit(ragged_matmul_reference), *matmul_args, tflops, baseline_of="grouped matmul (kernel)",
                needs_kernels=False),
    ]


# ---------------------------------------------------------------------------------------------
# Decoding and training: the model's own steps (kernels chosen by `auto` for the target).

def bf16(cfg):
    return cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")


def lite_2l():
    return bf16(get_config("longcat-flash-lite", num_layers=2, n_routed_experts=32,
                           ngram_vocab_ratio=1)).replace(name="lite-2l")


def decode_programs(quick: bool) -> list[Program]:
    cfg = get_config("tiny") if quick else bf16(get_config("demo"))
    cache_len = 64 if quick else 1024
    graphdef, state = nnx.split(abstract_model(cfg))
    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    real_state = functools.cache(lambda: nnx.state(LongcatModel(cfg, rngs=nnx.Rngs(0))))  # one model, three batches

    @jax.jit
    def step(state, cache, tokens):
        return nnx.merge(graphdef, state).decode_step(cache, tokens)

    programs = []
    for batch in (1, 8, 64):
        def abstract(batch=batch):
            cache = DecodeCache(tuple(sds((batch, cache_len, row), cfg.jnp_compute_dtype) for _ in range(2 * cfg.num_layers)),
                                sds((batch,), jnp.int32), sds((batch, max(cfg.ngram_n - 1, 0)), jnp.int32))
            return state, cache, sds((batch,), jnp.int32)

        def make(batch=batch):
            model_state = real_state()
            cache = DecodeCache(tuple(filled((batch, cache_len, row), cfg.jnp_compute_dtype)
                                      for _ in range(2 * cfg.num_layers)),
                                jnp.full((batch,), cache_len // 2, jnp.int32),
                                integers((batch, max(cfg.ngram_n - 1, 0)), cfg.vocab_size))
            return model_state, cache, integers((batch,), cfg.vocab_size)

        programs.append(Program("decode", f"decode step, batch {batch}", f"{cfg.name}, cache {cache_len}", step,
                                abstract, make, lambda s, batch=batch: f"{batch / s:,.0f} tok/s",
                                needs_kernels=cfg.has_ngram))
    return programs


def train_programs(quick: bool, peak: float) -> list[Program]:
    presets = [get_config("tiny")] if quick else [bf16(get_config("demo")), lite_2l()]
    batch, seq_len = (4, 64) if quick else (16, 1024)  # quick: > 128 tokens, so the routed experts (kernels) run
    programs = []
    for cfg in presets:
        tcfg = TrainConfig(batch_size=batch, seq_len=seq_len, steps=100)
        plan = plan_state(cfg, tcfg)
        tokens = sds((batch, seq_len), jnp.int32)
        step = jax.jit(make_train_step(plan.graphdef, plan.tx, cfg, tcfg))
        per_token = flops_per_token(cfg, seq_len, cfg.target_ffn_experts_per_token)

        def rate(s, per_token=per_token):
            tok_s = batch * seq_len / s
            mfu = f", MFU {per_token * tok_s / peak:.1%}" if math.isfinite(peak) else ""
            return f"{tok_s:,.0f} tok/s{mfu}"

        programs.append(Program(
            "train", f"training step, {cfg.name}", f"batch {batch} x {seq_len}, AdamW", step,
            lambda plan=plan, tokens=tokens: (plan.abstract(), tokens, tokens, sds((), jnp.int32)),
            lambda plan=plan, cfg=cfg: (jax.jit(plan.create)(), integers((batch, seq_len), cfg.vocab_size),
                                            jnp.ones((batch, seq_len), jnp.int32), jnp.int32(100)),
            rate))
    return programs


# ---------------------------------------------------------------------------------------------

def run(programs: list[Program], repeats: int, budget_s: float) -> list[tuple]:
    begin, seconds, rows = time.perf_counter(), {}, []
    for p in programs:
        if time.perf_counter() - begin > budget_s:
            rows.append((p, "skipped: time budget spent", ""))
            continue
        print(f"[{time.perf_counter() - begin:6.1f} s] {p.name} ({p.shape})", file=sys.stderr, flush=True)
        try:
            args = p.make()
            seconds[p.name] = timed(p.fn, *args, repeats=repeats)
            del args
        except Exception as error:  # noqa: BLE001 - one failing program must not end the run
            rows.append((p, f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:160]}", ""))
            continue
        ours = seconds.get(p.baseline_of) if p.baseline_of else None
        ratio = f"{seconds[p.name] / ours:.2f}x" if ours else ""  # baseline time / our time: > 1 when ours is faster
        rows.append((p, f"{seconds[p.name] * 1e3:.3f} ms, {p.rate(seconds[p.name])}", ratio))
    return rows


def table(rows, device_kind: str) -> str:
    lines = [f"jax {jax.__version__}, {device_kind}", "",
             "| section | program | shape | time and rate | speed-up of ours over this baseline |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {p.section} | {p.name} | {p.shape} | {result} | {ratio} |" for p, result, ratio in rows]
    return "\n".join(lines) + "\n"


def compile_only(programs: list[Program], device) -> int:
    sharding = jax.sharding.SingleDeviceSharding(device)
    failures = 0
    for p in programs:
        begin = time.perf_counter()
        try:
            args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), p.abstract())
            compiled = p.fn.lower(*args).compile()
            kernels = topology.describe_pallas_calls(compiled)
            if p.needs_kernels and kernels == "none":
                raise RuntimeError("compiled without any Pallas kernel (fell back to XLA)")
            memory = compiled.memory_analysis()
            held = sum(getattr(memory, f"{k}_size_in_bytes", 0) for k in ("argument", "output", "temp")) if memory else 0
            print(f"ok   {p.name} ({p.shape}): {time.perf_counter() - begin:.1f} s, {held / 2**30:.2f} GiB "
                  f"(arguments + outputs + temporaries); Pallas kernels: {kernels}", flush=True)
        except Exception as error:  # noqa: BLE001 - report every program, then fail
            failures += 1
            print(f"FAIL {p.name} ({p.shape}): {type(error).__name__}: {str(error)[:1500]}", flush=True)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-only", metavar="TARGET", help="h200, or a TPU spec like v5e:1x1")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (on CPU: kernels in interpret mode)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=390.0, help="start no program after this many seconds")
    parser.add_argument("--out", default="accelerator.md", help="where the markdown table is also written")
    args = parser.parse_args(argv)

    if args.compile_only:
        spec = "h200:1x1" if args.compile_only == "h200" else args.compile_only
        devices = topology.topology_devices(spec)
        topology.set_default_device(devices)  # the kernels are chosen for, and lowered to, this device
        platform = kernel_backend.target_platform()
        programs = kernel_programs(args.quick, platform) + decode_programs(args.quick) + \
            train_programs(args.quick, math.nan)
        print(f"compiling {len(programs)} programs for {devices[0].device_kind} ({spec})", flush=True)
        return compile_only(programs, devices[0])

    device = jax.devices()[0]
    platform = kernel_backend.target_platform()
    backend = platform if platform in ("tpu", "gpu") else "interpret"
    programs = kernel_programs(args.quick, backend) + decode_programs(args.quick) + \
        train_programs(args.quick, peak_flops(device, TrainConfig())[0])
    if backend == "interpret":  # CPU: the model's steps also run their kernels in interpret mode
        with kernel_backend.forced("interpret"):
            rows = run(programs, args.repeats, args.budget_s)
    else:
        rows = run(programs, args.repeats, args.budget_s)
    text = table(rows, device.device_kind)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    return 1 if any(result.startswith("FAILED") for _, result, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
