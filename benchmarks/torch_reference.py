"""The PyTorch reference the benchmarks compare against, and how they take turns with it.

`transformers`' LongcatFlashForCausalLM at one of our configs (`hf_model`), when torch and
transformers are importable (never a project dependency: `pip install torch transformers` to
compare). Both sides are timed the same way: taking turns, so that a burst of load on a shared
machine hits them alike, best of N; torch at the faster of one thread and all cores (on a busy machine
its thread pool can be many times slower with more threads than free cores).

    alternate(runs, repeats)    each run is a separate process (no shared thread pools), in turns
    fastest_thread_count(...)   torch's thread counts, warm-up first, the slow ones dropped
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from typing import Callable, Sequence

from lite.config import ModelConfig


def missing_reference() -> str | None:
    """None when torch and a transformers with LongcatFlash import, else why not (one line).

    Imports them with this folder off sys.path: transformers imports the `kernels` package when it is
    installed, and benchmarks/kernels.py (on sys.path when a benchmark runs as a script) would stand in
    for it. Once imported, the real package stays in sys.modules."""
    here = os.path.dirname(os.path.abspath(__file__))
    shadowing = [p for p in sys.path if os.path.abspath(p or os.curdir) == here]
    sys.path[:] = [p for p in sys.path if p not in shadowing]
    try:
        import torch  # noqa: F401
        from transformers import LongcatFlashConfig, LongcatFlashForCausalLM  # noqa: F401
        with contextlib.suppress(ImportError):
            importlib.import_module("kernels")  # the installed package, if any (not benchmarks/kernels.py)
    except ImportError as error:
        return f"no PyTorch reference: {error} (pip install torch 'transformers>=5' to compare)"
    finally:
        sys.path[:0] = shadowing
    return None


def hf_model(cfg: ModelConfig, seed: int = 0):
    """transformers' LongcatFlashForCausalLM with `cfg`'s trunk (no N-gram embedding: transformers has
    none), random weights, float32, sdpa attention."""
    import torch
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    torch.manual_seed(seed)
    return LongcatFlashForCausalLM(LongcatFlashConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=0, rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
        ffn_hidden_size=cfg.ffn_hidden_size, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, moe_topk=cfg.moe_topk, n_routed_experts=cfg.n_routed_experts,
        zero_expert_num=cfg.zero_expert_num, expert_ffn_hidden_size=cfg.expert_ffn_hidden_size,
        routed_scaling_factor=cfg.routed_scaling_factor, attn_implementation="sdpa"))


def torch_thread_counts() -> list[int]:
    return sorted({1, os.cpu_count() or 1})


def fastest_thread_count(timed: Callable[[int], float]) -> dict[int, list[float]]:
    """Warm-up with every thread count (`timed(n)` sets it and returns seconds); a count more than twice
    as slow as the fastest cannot win and is dropped -> {kept count: []} for the caller's timings."""
    warm = {n: timed(n) for n in torch_thread_counts()}
    return {n: [] for n, t in warm.items() if t <= 2 * min(warm.values())}


def run_worker(argv: Sequence[str]) -> float:
    """Run `python argv...` (a benchmark in its worker mode); its last output line is one JSON number."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"benchmark worker {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def alternate(runs: dict[str, Sequence[str]], repeats: int, report: Callable[[str], None] = print) -> dict[str, float]:
    """Each run (name -> worker argv printing a rate, higher is better) `repeats` times in turns, each
    in its own process -> the best rate per name. A run more than twice as slow as another run of the
    same `group` in the first round ("torch@1" and "torch@2": name up to "@") is not repeated."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for attempt in range(repeats):
        for name, argv in runs.items():
            if attempt and name in dropped(results):
                continue
            results[name].append(run_worker(argv))
            report(f"  round {attempt + 1}: {name} {results[name][-1]:,.1f}")
    return {name: max(rates) for name, rates in results.items()}


def dropped(results: dict[str, list[float]]) -> set[str]:
    """Names whose first rate is under half the best first rate of their group (same text before '@')."""
    best: dict[str, float] = {}
    for name, rates in results.items():
        group = name.split("@")[0]
        best[group] = max(best.get(group, 0.0), rates[0])
    return {name for name, rates in results.items() if "@" in name and rates[0] < best[name.split("@")[0]] / 2}
