"""Hash-collision study (the paper's Fig. 3): how often distinct n-grams share a row of a sub-table.

    python -m lite.experiments.collisions                 # the KJV corpus, demo vocabulary (4096)
    python -m lite.experiments.collisions --vocab-size 8192 --out runs/collisions

For each order n = 2..N and each candidate sub-table size V, every distinct n-gram of the corpus
(as the model sees it: windows restart after EOS, see lite.ngram) is hashed with
H = sum_j t_{i-j} (V0^j mod V) mod V, and the collision rate is the share of distinct n-grams whose
row also holds another one. Sizes at integer multiples of V0 are the bad case: for bigrams
H = t_i + V0 * t_{i-1} mod m*V0 depends on t_{i-1} only through t_{i-1} mod m. Prints a table, writes
collisions.png and collisions.json, and recommends sizes near a target ratio for the vocabulary.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from lite.config import get_config
from lite.data import encode_documents, kjv_corpus, load_tokenizer, train_tokenizer


def distinct_windows(docs: list[np.ndarray], order: int, eos_token_id: int) -> np.ndarray:
    """int64[U, order]: the distinct n-gram windows (t_i, t_{i-1}, ...) with 0 before a segment start."""
    windows = []
    for doc in docs:
        segment_start = 0
        rows = np.zeros((len(doc), order), np.int64)
        for i, token in enumerate(doc):
            for j in range(order):
                rows[i, j] = doc[i - j] if i - j >= segment_start else 0
            if token == eos_token_id:
                segment_start = i + 1
        windows.append(rows)
    return np.unique(np.concatenate(windows), axis=0)


def hashed_rows(windows: np.ndarray, vocab_size: int, table_size: int) -> np.ndarray:
    """int64[U, n] windows -> int64[U] rows of a sub-table of table_size (lite.ngram's hash, in int64)."""
    coefficients = np.array([pow(vocab_size, j, table_size) for j in range(windows.shape[1])], np.int64)
    return (windows % table_size * coefficients % table_size).sum(axis=1) % table_size  # < n * V: no overflow


def collision_rate(windows: np.ndarray, vocab_size: int, table_size: int) -> float:
    """Share of the distinct windows int64[U, n] whose hashed row in a table of table_size also holds another."""
    _, inverse, counts = np.unique(hashed_rows(windows, vocab_size, table_size), return_inverse=True,
                                   return_counts=True)
    return float(np.mean(counts[inverse] > 1))


def random_hash_rate(num_distinct: int, table_size: int) -> float:
    """The same share if rows were drawn uniformly at random: 1 - (1 - 1/V)^(U - 1)."""
    return float(1 - (1 - 1 / table_size) ** (num_distinct - 1))


def candidate_sizes(vocab_size: int, ratios: list[float]) -> list[tuple[str, int]]:
    """For each ratio r: exactly r*V0 (a multiple when r is whole), the released form r*V0 + 2s + 1
    (s = 0), r*V0 shifted by a third of V0, and the recommended prime from (r + 1/2) V0."""
    sizes = []
    for r in ratios:
        base = int(round(r * vocab_size))
        sizes += [(f"{r:g} x V0", base), (f"{r:g} x V0 + 1", base + 1), (f"{r:g} x V0 + V0/3", base + vocab_size // 3),
                  (f"{r:g} x V0 + V0/2, prime", recommend(vocab_size, r))]
    return sizes


def recommend(vocab_size: int, target_ratio: float) -> int:
    """A sub-table size near target_ratio * V0: the first prime from halfway between two multiples
    of V0. Measured on KJV (README): an odd size halfway between multiples still doubled the random
    bigram collision rate (it is a multiple of V0 / 2 plus one), a prime there came out at random."""
    size = int((np.floor(target_ratio) + 0.5) * vocab_size)
    while not _is_prime(size):
        size += 1
    return size


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, int(n ** 0.5) + 1))


def study(docs: list[np.ndarray], vocab_size: int, eos_token_id: int, max_order: int,
          ratios: list[float]) -> dict:
    results = {"vocab_size": vocab_size, "orders": {}}
    for order in range(2, max_order + 1):
        windows = distinct_windows(docs, order, eos_token_id)
        results["orders"][order] = {"distinct": int(len(windows)), "sizes": [
            {"label": label, "size": size, "collision_rate": collision_rate(windows, vocab_size, size)}
            for label, size in candidate_sizes(vocab_size, ratios)]}
    return results


def format_table(results: dict) -> str:
    orders = sorted(results["orders"])
    first = results["orders"][orders[0]]["sizes"]
    lines = ["| size | rows | " + " | ".join(f"{n}-grams ({results['orders'][n]['distinct']:,})" for n in orders)
             + " |", "| --- | ---: | " + " | ".join("---:" for _ in orders) + " |"]
    for i, entry in enumerate(first):
        cells = [f"{results['orders'][n]['sizes'][i]['collision_rate']:.2%} "
                 f"({random_hash_rate(results['orders'][n]['distinct'], entry['size']):.1%})" for n in orders]
        lines.append(f"| {entry['label']} | {entry['size']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n(in brackets: the rate if rows were drawn uniformly at random)"


def plot(results: dict, path: pathlib.Path) -> None:
    """One panel per order: a line per kind of size (multiple, +1, +V0/3) and the random-hash rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v0 = results["vocab_size"]
    orders = sorted(results["orders"])
    fig, axes = plt.subplots(1, len(orders), figsize=(5 * len(orders), 4), squeeze=False)
    for ax, order in zip(axes[0], orders):
        data = results["orders"][order]
        kinds: dict[str, list] = {}
        for entry in data["sizes"]:
            kind = entry["label"].split("x V0", 1)[1].strip() or "exact multiple"
            kinds.setdefault(kind, []).append(entry)
        for kind, entries in kinds.items():
            ax.plot([e["size"] / v0 for e in entries], [e["collision_rate"] for e in entries], marker="o",
                    label=f"r x V0 {kind}" if kind != "exact multiple" else "r x V0 (a multiple)")
        sizes = [e["size"] for e in next(iter(kinds.values()))]
        ax.plot([v / v0 for v in sizes], [random_hash_rate(data["distinct"], v) for v in sizes], "k--",
                label="random rows")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sub-table size / V0")
        ax.set_title(f"{order}-grams ({data['distinct']:,} distinct)")
        ax.set_ylabel("share of distinct n-grams sharing a row")
        ax.legend(fontsize=8)
    fig.suptitle(f"hash collisions, V0 = {v0}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=get_config("demo").vocab_size)
    parser.add_argument("--ratios", default="16,32,64,128", help="table size / V0 values to try")
    parser.add_argument("--max-order", type=int, default=3)
    parser.add_argument("--target-ratio", type=float, default=78.0, help="for the recommendation")
    parser.add_argument("--out", default="runs/collisions")
    parser.add_argument("--cache-dir", default=str(pathlib.Path.home() / ".cache" / "longcat-lite"))
    args = parser.parse_args(argv)

    cfg = get_config("demo", vocab_size=args.vocab_size)
    corpus = kjv_corpus()
    tokenizer = load_tokenizer(train_tokenizer(corpus.train, cfg, args.cache_dir))
    docs = encode_documents(tokenizer, corpus.train, cfg)
    ratios = [float(r) for r in args.ratios.split(",")]
    results = study(docs, args.vocab_size, cfg.eos_token_id, args.max_order, ratios)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "collisions.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "collisions.png")
    print(f"KJV, {sum(map(len, docs)):,} tokens, V0 = {args.vocab_size}\n")
    print(format_table(results))
    print(f"\nrecommended sub-table size near {args.target_ratio:g} x V0: {recommend(args.vocab_size, args.target_ratio):,} "
          f"(the first prime from halfway between two multiples of V0); wrote {out}/collisions.png and "
          "collisions.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
