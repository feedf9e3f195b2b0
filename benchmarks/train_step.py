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
LongcatFlashForCausalLM (sdpa attention) with torch.optim.AdamW. Each side at the faster of 1 thread
and all cores (XLA:CPU single-threaded by XLA_FLAGS, torch by set_num_threads).

Table 2, the N-gram embedding's cost: the preset against its twin without the embedding, whose dense
MLPs are widened until the activated parameters (at the target number of FFN experts per token)
match as closely as integer widths allow; rows packed with 4 documents each, as train.py packs.

Every variant runs in its own process (`--worker`), `--steps` timed steps after one compile / warm-up
step; the variants take turns for `--repeats` rounds and each reports its best round
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

import jax
import jax.numpy as jnp
import numpy as np

from lite.config import ModelConfig, get_config
from lite.host import keep_freed_memory
from lite.params import count_params
from lite.training import TrainConfig, init_state, make_train_step
from torch_reference import alternate, hf_model, missing_reference, torch_thread_counts  # benchmarks/ is on sys.path

# XLA:CPU on one thread, the counterpart of torch.set_num_threads(1): on a machine busier than its cores,
# a thread pool that waits for every thread at each op can be slower than one thread, on both sides.
SINGLE_THREADED_XLA = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")


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


def ours_tokens_per_second(cfg: ModelConfig, rows: int, seq_len: int, steps: int, documents: int) -> float:
    tcfg = TrainConfig(batch_size=rows, seq_len=seq_len, steps=steps)
    graphdef, state, tx = init_state(cfg, tcfg)
    step = jax.jit(make_train_step(graphdef, tx, cfg, tcfg))
    tokens, segments = map(jnp.asarray, batch(cfg, rows, seq_len, documents))
    total = jnp.int32(1000)
    state, metrics = step(state, tokens, segments, total)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, tokens, segments, total)
    jax.block_until_ready(metrics)
    return steps * rows * seq_len / (time.perf_counter() - start)


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

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * rows * seq_len / (time.perf_counter() - start)


def worker(args) -> None:
    """One variant's tokens/s, printed as the last line (JSON)."""
    name, _, threads = args.worker.partition("@")
    cfg = variant_config(args.preset, name)
    if name != "torch":
        keep_freed_memory()  # as train.py does
    if name != "torch" and threads == "1":  # read when the CPU backend starts, on the first computation below
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *SINGLE_THREADED_XLA])
    if name == "torch":
        if missing := missing_reference():
            raise SystemExit(missing)
        speed = torch_tokens_per_second(cfg, args.batch, args.seq_len, args.steps, int(threads))
    else:
        speed = ours_tokens_per_second(cfg, args.batch, args.seq_len, args.steps, 1 if name == "trunk" else 4)
    print(json.dumps(speed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of turns; each variant's best round counts")
    parser.add_argument("--skip-reference", action="store_true", help="no transformers comparison")
    parser.add_argument("--skip-ngram", action="store_true", help="no N-gram embedding table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # ngram | twin | trunk@THREADS | torch@THREADS
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with_ngram = get_config(args.preset)
    if not with_ngram.has_ngram and not args.skip_ngram:
        raise SystemExit(f"preset {args.preset} has no N-gram embedding to compare against (use --skip-ngram)")
    missing = None if args.skip_reference else missing_reference()
    threads = torch_thread_counts()
    names = [] if args.skip_reference or missing else [f"{side}@{n}" for side in ("trunk", "torch") for n in threads]
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
            print(f"{'':<52}{'tokens/s':>10}")
            print(f"{f'ours (lite.training.make_train_step), {ours[6:]} thr.':<52}{best[ours]:>10,.0f}")
            print(f"{f'transformers {transformers.__version__}, torch {torch.__version__}, {theirs[6:]} thr.':<52}"
                  f"{best[theirs]:>10,.0f}")
            print(f"{'ratio':<52}{best[ours] / best[theirs]:>9.2f}x")
    if not args.skip_ngram:
        print("\nN-gram embedding cost at equal activated parameters, 4 documents per row")
        print(f"{'variant':<28}{'total params':>14}{'activated':>12}{'tokens/s':>11}")
        for name, label in (("ngram", "with N-gram embedding"), ("twin", "without (wider dense MLPs)")):
            cfg = variant_config(args.preset, name)
            print(f"{label:<28}{count_params(cfg).total:>14,}{activated(cfg):>12,.0f}{best[name]:>11,.0f}")
        print(f"with / without N-gram embedding: {best['ngram'] / best['twin']:.3f}x the tokens/s")


if __name__ == "__main__":
    main()
