"""Training-step throughput of a preset with and without the N-gram embedding, at equal activated parameters.

    python benchmarks/train_step.py                       # demo preset, batch 8 x 256
    python benchmarks/train_step.py --preset demo --batch 32 --seq-len 512 --steps 10

Without the N-gram embedding the model loses the N-gram projections (activated parameters), so its
dense MLPs are widened until the activated parameters (at the target number of FFN experts per
token) match as closely as integer widths allow; the table prints both counts. The step is the one
train.py runs (lite.training.make_train_step): forward, backward, AdamW, router-bias update.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lite.config import ModelConfig, get_config
from lite.params import count_params
from lite.training import TrainConfig, init_state, make_train_step


def activated(cfg: ModelConfig) -> float:
    return count_params(cfg).activated(cfg.target_ffn_experts_per_token)


def without_ngram(cfg: ModelConfig) -> ModelConfig:
    """ngram_n = 0, dense MLP width chosen so the activated parameters match `cfg`'s."""
    plain = cfg.replace(ngram_n=0)
    missing = activated(cfg) - activated(plain)
    per_unit = activated(plain.replace(ffn_hidden_size=plain.ffn_hidden_size + 1)) - activated(plain)
    return plain.replace(ffn_hidden_size=plain.ffn_hidden_size + round(missing / per_unit))


def tokens_per_second(cfg: ModelConfig, batch: int, seq_len: int, steps: int) -> float:
    tcfg = TrainConfig(batch_size=batch, seq_len=seq_len, steps=steps)
    graphdef, state, tx = init_state(cfg, tcfg)
    step = jax.jit(make_train_step(graphdef, tx, cfg, tcfg))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, seq_len)), jnp.int32)
    segments = jnp.asarray(np.repeat(np.arange(1, 5), -(-seq_len // 4))[None, :seq_len].repeat(batch, 0), jnp.int32)
    total = jnp.int32(1000)
    state, metrics = step(state, tokens, segments, total)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, tokens, segments, total)
    jax.block_until_ready(metrics)
    return steps * batch * seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one compile step)")
    args = parser.parse_args()

    with_ngram = get_config(args.preset)
    if not with_ngram.has_ngram:
        raise SystemExit(f"preset {args.preset} has no N-gram embedding to compare against")
    variants = (("with N-gram embedding", with_ngram), ("without (wider dense MLPs)", without_ngram(with_ngram)))
    print(f"{args.preset}: training step, batch {args.batch} x {args.seq_len}, {args.steps} timed steps, "
          f"{jax.devices()[0].device_kind}")
    print(f"{'variant':<28}{'total params':>14}{'activated':>12}{'tokens/s':>11}")
    results = []
    for name, cfg in variants:
        speed = tokens_per_second(cfg, args.batch, args.seq_len, args.steps)
        results.append(speed)
        print(f"{name:<28}{count_params(cfg).total:>14,}{activated(cfg):>12,.0f}{speed:>11,.0f}", flush=True)
    print(f"with / without N-gram embedding: {results[0] / results[1]:.3f}x the tokens/s")


if __name__ == "__main__":
    main()
