"""What a train.py start spends on its training documents: tokenising the corpus in Python
(lite.data.encode_documents, every start without the cache) vs opening the token cache
(lite.data.cached_documents: hashing the texts, checking the entry's sha256, memory-mapping it),
and the first batches of the grain pipeline over each. The KJV with the demo preset's tokenizer by
default, or --data files.

    python benchmarks/token_cache.py [--data my_texts/] [--preset demo] [--repeats 3]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np

from lite.config import get_config
from lite.data import (cached_documents, encode_documents, kjv_corpus, load_corpus, load_tokenizer, train_tokenizer,
                       training_batches)


def best_of(repeats: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def first_batches(docs, count: int = 100) -> list[dict]:
    batches = iter(training_batches(docs, 256, 8, seed=0))
    return [next(batches) for _ in range(count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=None, help="default: the KJV")
    parser.add_argument("--preset", default="demo", help="its vocab_size sizes the trained tokenizer")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cfg = get_config(args.preset)
    corpus = load_corpus(args.data) if args.data else kjv_corpus()
    with tempfile.TemporaryDirectory() as cache:
        tokenizer = load_tokenizer(train_tokenizer(corpus.train, cfg, cache))
        encode_s, listed = best_of(args.repeats, lambda: encode_documents(tokenizer, corpus.train, cfg))
        start = time.perf_counter()
        cached_documents(tokenizer, corpus.train, cfg, cache)
        build_s = time.perf_counter() - start
        open_s, cached = best_of(args.repeats, lambda: cached_documents(tokenizer, corpus.train, cfg, cache))
        list_batches_s, want = best_of(args.repeats, lambda: first_batches(listed))
        cache_batches_s, got = best_of(args.repeats, lambda: first_batches(cached))
        assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(want, got))
        size = sum(p.stat().st_size for p in pathlib.Path(cache, "tokens").rglob("*.npy"))
    tokens = int(cached.offsets[-1])
    print(f"{corpus.name}: {len(corpus.train):,} training documents, {tokens:,} tokens "
          f"({size / 2**20:.1f} MiB cached), tokenizer {tokenizer.get_piece_size()} pieces; best of {args.repeats}")
    print("| what | in-memory documents (encode_documents) | token cache (cached_documents) | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| a start's documents | {encode_s:.3f} s (tokenise) | {open_s:.3f} s (open; building it once: "
          f"{build_s:.3f} s) | {encode_s / open_s:.1f}x |")
    print(f"| first 100 batches of 8 x 256 | {list_batches_s:.3f} s | {cache_batches_s:.3f} s | "
          f"{list_batches_s / cache_batches_s:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
