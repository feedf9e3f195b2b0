"""Training-step throughput: ours against transformers at equal config, and the N-gram embedding's
cost at equal activated parameters.

    python benchmarks/train_step.py                       # demo preset, batch 8 x 256, 2 rounds
    python benchmarks/train_step.py --preset demo --batch 8 --seq-len 256 --steps 4 --repeats 3
    python benchmarks/train_step.py --skip-reference      # the N-gram table only

One step = forward, next-token loss, backward, AdamW (gradient clipping at 1.0), float32. Ours is
the step train.py runs (lite.training.make_train_step, router-bias update included), with the
process setting train.py makes (lite.host.keep_freed_memory).

Table 1, ours vs transformers (when torch and transformers are importable): the preset's trunk
without the N-gram embedding (transformers has none), one document per row; transformers'
LongcatFlashForCausalLM (sdpa attention) with torch.optim.AdamW. Each side at the faster of one core
and all cores ("@1": the process pinned to one core with sched_setaffinity, torch also told
set_num_threads(1); XLA:CPU's own flags for one thread do not stop its YNNPACK products from using
every core). Below it, the bound the machine puts on any implementation of this step on XLA:CPU:
the step's matrix products alone, at their shapes, nothing else (`step_products`).

Table 2, the N-gram embedding's cost: the preset against its twin without the embedding, whose dense
MLPs are widened until the activated parameters (at the target number of FFN experts per token)
match as closely as integer widths allow; rows packed with 4 documents each, as train.py packs.

Every variant runs in its own process (`--worker`) and reports its fastest of `--steps` timed steps
after WARM_UP_STEPS untimed ones (the first compiles; a fresh process's allocator is still growing
in the second); the variants take turns for `--repeats` rounds and each reports its best round
(benchmarks/torch_reference.py). Our processes share a persistent compilation cache, so only the
first round compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lite.config import ModelConfig, get_config
from lite.host import keep_freed_memory
from lite.params import count_params
from lite.training import TrainConfig, init_state, make_train_step
from torch_reference import alternate, hf_model, missing_reference, torch_thread_counts  # benchmarks/ is on sys.path

WARM_UP_STEPS = 2  # both sides; timed from the third step on


def activated(cfg: ModelConfig) -> float:
    return count_params(cfg).activated(cfg.target_ffn_experts_per_token)


def without_ngram(cfg: ModelConfig) -> ModelConfig:
    """ngram_n = 0, dense MLP width chosen so the activated parameters match `cfg`'s."""
    plain = cfg.replace(ngram_n=0)
    missing = activated(cfg) - activated(plain)
    per_unit = activated(plain.replace(ffn_hidden_size=plain.ffn_hidden_size + 1)) - activated(plain)
    return plain.replace(ffn_hidden_size=plain.ffn_hidden_size + round(missing / per_unit))


def variant_config(preset: str, variant: str) -> ModelConfig:
    """ngram: the preset; twin: without N-gram, wider dense MLPs; trunk (and torch): without N-gram."""
    cfg = get_config(preset)
    return {"ngram": cfg, "twin": without_ngram(cfg), "trunk": cfg.replace(ngram_n=0)}.get(variant, cfg.replace(ngram_n=0))


def batch(cfg: ModelConfig, rows: int, seq_len: int, documents: int) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens int32[rows, seq_len] and segment ids with `documents` equal segments per row."""
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (rows, seq_len)).astype(np.int32)
    segments = np.repeat(np.arange(1, documents + 1), -(-seq_len // documents))[None, :seq_len].repeat(rows, 0)
    return tokens, segments.astype(np.int32)


def fastest_step(step: Callable[[], None], steps: int) -> float:
    """Seconds of the fastest of `steps` timed calls of `step` after WARM_UP_STEPS untimed ones. The
    fastest, not the mean: on a shared machine other work only ever adds time, and here single steps
    of the same program vary by up to 1.7x; both sides are timed alike."""
    for _ in range(WARM_UP_STEPS):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def ours_tokens_per_second(cfg: ModelConfig, rows: int, seq_len: int, steps: int, documents: int) -> float:
    tcfg = TrainConfig(batch_size=rows, seq_len=seq_len, steps=steps)
    graphdef, state, tx = init_state(cfg, tcfg)
    step = jax.jit(make_train_step(graphdef, tx, cfg, tcfg))
    tokens, segments = map(jnp.asarray, batch(cfg, rows, seq_len, documents))
    total = jnp.int32(1000)

    def one_step():
        nonlocal state
        state, metrics = step(state, tokens, segments, total)
        jax.block_until_ready(metrics)

    return rows * seq_len / fastest_step(one_step, steps)


def step_products(cfg: ModelConfig, rows: int, seq_len: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """The matrix products of one training step of `cfg`'s trunk (no N-gram embedding) ->
    (weight products (rows, in, out), each run forward, for d_input and for d_weight;
    attention (batch x heads, head dim) score and value products over the causal half of the
    L x L square, the least any skipping of masked scores leaves: [L, e] x [e, L/2], [L, L/2] x [L/2, e]).
    The routed experts at `target_ffn_experts_per_token` rows per token, exactly, no tile padding."""
    tokens, d, h = rows * seq_len, cfg.hidden_size, cfg.num_heads
    attention = [(d, cfg.q_lora_rank), (cfg.q_lora_rank, h * cfg.qk_head_dim),
                 (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                 (cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim)), (h * cfg.v_head_dim, d)]
    mlp = [(d, cfg.ffn_hidden_size), (d, cfg.ffn_hidden_size), (cfg.ffn_hidden_size, d)]
    experts = [(d, cfg.expert_ffn_hidden_size), (d, cfg.expert_ffn_hidden_size), (cfg.expert_ffn_hidden_size, d)]
    expert_rows = round(tokens * cfg.target_ffn_experts_per_token)
    weights = [(tokens, k, n) for _ in range(2 * cfg.num_layers) for k, n in attention + mlp]
    weights += [(expert_rows, k, n) for _ in range(cfg.num_layers) for k, n in experts]
    weights += [(tokens, d, cfg.n_routed_experts + cfg.zero_expert_num)] * cfg.num_layers + [(tokens, d, cfg.vocab_size)]
    scores = [(rows * h, cfg.qk_head_dim), (rows * h, cfg.v_head_dim)] * (2 * cfg.num_layers)
    return weights, scores


def products_tokens_per_second(cfg: ModelConfig, rows: int, seq_len: int, steps: int) -> float:
    """Tokens/s if a training step were its matrix products alone (forward and backward, float32,
    XLA:CPU, every product's result written out): what no implementation on XLA:CPU can beat."""
    weights, scores = step_products(cfg, rows, seq_len)
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    half = seq_len // 2
    operands = ([(normal(m, k), normal(k, n), normal(m, n)) for m, k, n in weights],
                [(normal(b, seq_len, e), normal(b, seq_len, half)) for b, e in scores])

    def products(operands):
        out = []
        for x, w, dy in operands[0]:
            out += [x @ w, dy @ w.T, x.T @ dy]
        for q, p in operands[1]:  # q: an [L, e] operand (queries, keys, values), p: [L, L/2] (scores, probs)
            kept = q[:, :half]  # the keys / values the causal half reaches
            out += [q @ jnp.swapaxes(kept, 1, 2), p @ kept, jnp.swapaxes(p, 1, 2) @ q]  # forward, backward's two
        return [jax.lax.optimization_barrier(o) for o in out]  # no product fused into or skipped for another

    run = jax.jit(products)
    return rows * seq_len / fastest_step(lambda: jax.block_until_ready(run(operands)), steps)


def step_flops(cfg: ModelConfig, rows: int, seq_len: int) -> float:
    weights, scores = step_products(cfg, rows, seq_len)
    return 6 * sum(m * k * n for m, k, n in weights) + 6 * sum(b * seq_len * (seq_len // 2) * e for b, e in scores)


def torch_tokens_per_second(cfg: ModelConfig, rows: int, seq_len: int, steps: int, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    tcfg = TrainConfig()
    model = hf_model(cfg).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=tcfg.weight_decay), dict(params=rest, weight_decay=0.0)],
                                  lr=tcfg.learning_rate, betas=(tcfg.adam_b1, tcfg.adam_b2), eps=tcfg.adam_eps)
    tokens = torch.from_numpy(batch(cfg, rows, seq_len, 1)[0]).long()

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return rows * seq_len / fastest_step(step, steps)


def worker(args) -> None:
    """One variant's tokens/s, printed as the last line (JSON)."""
    name, _, threads = args.worker.partition("@")
    cfg = variant_config(args.preset, name)
    if name != "torch":
        keep_freed_memory()  # as train.py does
    if threads == "1" and hasattr(os, "sched_setaffinity"):  # Linux; before XLA's or torch's thread pools start
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if name == "torch":
        if missing := missing_reference():
            raise SystemExit(missing)
        speed = torch_tokens_per_second(cfg, args.batch, args.seq_len, args.steps, int(threads))
    elif name == "products":
        speed = products_tokens_per_second(cfg, args.batch, args.seq_len, args.steps)
    else:
        speed = ours_tokens_per_second(cfg, args.batch, args.seq_len, args.steps, 1 if name == "trunk" else 4)
    print(json.dumps(speed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process (after the warm-up steps)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of turns; each variant's best round counts")
    parser.add_argument("--skip-reference", action="store_true", help="no transformers comparison")
    parser.add_argument("--skip-ngram", action="store_true", help="no N-gram embedding table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # ngram | twin | products | trunk@CORES | torch@CORES
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with_ngram = get_config(args.preset)
    if not with_ngram.has_ngram and not args.skip_ngram:
        raise SystemExit(f"preset {args.preset} has no N-gram embedding to compare against (use --skip-ngram)")
    missing = None if args.skip_reference else missing_reference()
    threads = torch_thread_counts()
    names = [] if args.skip_reference or missing else [f"{side}@{n}" for side in ("trunk", "torch") for n in threads]
    names += [] if args.skip_reference else ["products"]
    names += [] if args.skip_ngram else ["ngram", "twin"]
    common = [os.path.abspath(__file__), "--preset", args.preset, "--batch", str(args.batch),
              "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    print(f"{args.preset}: training step, batch {args.batch} x {args.seq_len}, f32, {args.steps} timed steps per process, "
          f"best of {args.repeats} rounds; jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        os.environ.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        best = alternate({name: [*common, "--worker", name] for name in names}, args.repeats,
                         report=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"load after: {os.getloadavg()[0]:.2f}")

    if not args.skip_reference:
        trunk = variant_config(args.preset, "trunk")
        print(f"\nours vs transformers: {args.preset} trunk without the N-gram embedding "
              f"({count_params(trunk).total:,} params), one document per row")
        if missing:
            print(missing)
        else:
            import torch
            import transformers

            ours, theirs = (max((n for n in best if n.startswith(side)), key=best.get) for side in ("trunk@", "torch@"))
            cores = lambda name: "1 core" if name.endswith("@1") else f"{name.split('@')[1]} cores"  # noqa: E731
            print(f"{'':<56}{'tokens/s':>10}")
            for name in sorted(n for n in best if "@" in n):
                side = ("ours (lite.training.make_train_step)" if name.startswith("trunk") else
                        f"transformers {transformers.__version__}, torch {torch.__version__}")
                print(f"{f'{side}, {cores(name)}':<56}{best[name]:>10,.0f}")
            print(f"{'ratio, each side at its faster':<56}{best[ours] / best[theirs]:>9.2f}x")
        flops = step_flops(trunk, args.batch, args.seq_len)
        bound = best["products"]
        print(f"\nthe step's matrix products alone on XLA:CPU ({flops / 1e9:.1f} GFLOP a step, "
              f"{flops * bound / (args.batch * args.seq_len) / 1e9:.0f} GFLOP/s):")
        print(f"{'at most, were everything else free':<56}{bound:>10,.0f}")
        if not missing:
            for side, name in (("ours", ours), ("transformers", theirs)):
                print(f"{f'{side}, share of that bound':<56}{best[name] / bound:>10.0%}")
    if not args.skip_ngram:
        print("\nN-gram embedding cost at equal activated parameters, 4 documents per row")
        print(f"{'variant':<28}{'total params':>14}{'activated':>12}{'tokens/s':>11}")
        for name, label in (("ngram", "with N-gram embedding"), ("twin", "without (wider dense MLPs)")):
            cfg = variant_config(args.preset, name)
            print(f"{label:<28}{count_params(cfg).total:>14,}{activated(cfg):>12,.0f}{best[name]:>11,.0f}")
        print(f"with / without N-gram embedding: {best['ngram'] / best['twin']:.3f}x the tokens/s")


if __name__ == "__main__":
    main()
