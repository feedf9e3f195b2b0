"""The independent references the tests compare against, each written once: Python integers for
the N-gram hash, float64 NumPy loops for the grouped matmul and the MoE. Nothing here imports the
project's code paths under test; the MoE oracle only reads a module's weights."""

from __future__ import annotations

import numpy as np


def python_ngram_ids(row, *, vocab_size: int, max_order: int, tables_per_order: int, ratio: int,
                     eos: int | None = None, segments=None) -> np.ndarray:
    """int64[L, S] sub-table row ids of one token row, from ARCHITECTURE.md section 2 in Python
    integers, no modular shortcuts: sub-table s = (n - 2) * K + c has V_s = ratio * V0 + 2s + 1 rows,
    and the n-gram ending at token i lands in row (sum_{j<n} t_{i-j} * V0^j) mod V_s. Tokens before
    the row's start, before a change of `segments`, or up to an `eos` count as absent (0)."""
    row = [int(t) for t in row]
    out = []
    start = 0  # first position token i may look back to
    for i in range(len(row)):
        if i > 0 and (row[i - 1] == eos or (segments is not None and segments[i] != segments[i - 1])):
            start = i
        ids = []
        for s in range((max_order - 1) * tables_per_order):
            n, size = s // tables_per_order + 2, ratio * vocab_size + 2 * s + 1
            ids.append(sum(row[i - j] * vocab_size**j for j in range(n) if i - j >= start) % size)
        out.append(ids)
    return np.array(out, dtype=np.int64).reshape(len(row), -1)


def python_ngram_ids_of(row, cfg, segments=None) -> np.ndarray:
    """`python_ngram_ids` with the sizes of a ModelConfig."""
    return python_ngram_ids(row, vocab_size=cfg.vocab_size, max_order=cfg.ngram_n, tables_per_order=cfg.ngram_k,
                            ratio=cfg.ngram_vocab_ratio, eos=cfg.eos_token_id, segments=segments)


def numpy_grouped(lhs, rhs, group_sizes, offset: int = 0) -> np.ndarray:
    """float64 grouped matmul: rows of group offset + i use rhs[i]; every other row (other groups,
    rows past sum(group_sizes)) is zero."""
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    starts = np.concatenate([[0], np.cumsum(group_sizes)])
    for i in range(rhs.shape[0]):
        a, b = starts[offset + i], starts[offset + i + 1]
        out[a:b] = np.asarray(lhs[a:b], np.float64) @ np.asarray(rhs[i], np.float64)
    return out


def numpy_moe(moe, u, mask=None, capacity: int | None = None, shards: int = 1, drop=frozenset()):
    """float64 loops over tokens -> (out [T, D], chosen experts per token (sorted lists), dropped slots).

    Router: softmax in float64, top-k on scores + bias, weights = unbiased scores x routed scale. A
    zero expert returns its input. Padding (mask False) is not sent to the FFN experts. With a
    capacity: slot (t, j) of shard s is served by FFN expert e only if fewer than `capacity` earlier
    (t', j') of that shard, in token-major order, chose e; the others are dropped and counted.
    drop: (token, FFN expert) slots that are dropped and counted (`ragged_buffer_drops`)."""
    cfg = moe.cfg
    classifier = np.asarray(moe.router.classifier[...], np.float64)
    bias = np.asarray(moe.router.bias[...], np.float64)
    gate, up, down = (np.asarray(p[...], np.float64) for p in (moe.w_gate, moe.w_up, moe.w_down))
    u = np.asarray(u, np.float64)
    mask = np.ones(len(u), bool) if mask is None else np.asarray(mask)
    out, chosen_all, dropped, used = np.zeros_like(u), [], 0, {}
    per_shard = len(u) // shards
    for t in range(len(u)):
        logits = u[t] @ classifier
        scores = np.exp(logits - logits.max())
        scores /= scores.sum()
        chosen = np.argsort(-(scores + bias), kind="stable")[: cfg.moe_topk]  # biased scores choose
        chosen_all.append(sorted(int(e) for e in chosen))
        for e in chosen:
            weight = scores[e] * cfg.routed_scaling_factor  # unbiased scores weigh
            if e >= cfg.n_routed_experts:
                out[t] += weight * u[t]
                continue
            if not mask[t]:
                continue
            key = (t // per_shard, e)
            used[key] = used.get(key, 0) + 1
            if (capacity is not None and used[key] > capacity) or (t, int(e)) in drop:
                dropped += 1
                continue
            g = u[t] @ gate[e]
            out[t] += weight * ((g / (1 + np.exp(-g)) * (u[t] @ up[e])) @ down[e])
    return out, chosen_all, dropped


def ragged_buffer_drops(chosen, mask, num_ffn_experts: int, *, devices: int, expert_devices: int,
                        buffer_rows: int) -> set:
    """The (token, FFN expert) slots a ragged dispatch with `buffer_rows`-row receive buffers drops.

    chosen: per token its experts (numpy_moe's second result); mask bool[T]. The tokens are split
    into `devices` equal shards; shard i sits at position i % expert_devices of the expert axis,
    and position p owns FFN experts [p * E / n, (p + 1) * E / n). A device's buffer takes the slots
    from the devices of its expert group in order, each device's slots ordered by (expert, token);
    the slots past buffer_rows are dropped.
    """
    shard = len(chosen) // devices
    per_device = num_ffn_experts // expert_devices
    dropped = set()
    for group_start in range(0, len(chosen), shard * expert_devices):
        for dst in range(expert_devices):
            arrivals = []
            for src in range(expert_devices):
                first = group_start + src * shard
                arrivals += sorted((int(e), t) for t in range(first, first + shard) if mask[t]
                                   for e in chosen[t] if e < num_ffn_experts and e // per_device == dst)
            dropped |= {(t, e) for e, t in arrivals[buffer_rows:]}
    return dropped
