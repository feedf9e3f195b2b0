"""The one rule for `implementation="auto" | "pallas" | "xla"`, shared by every op in this package."""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("auto", "pallas", "xla")


def choose(op: str, implementation: str) -> str:
    """-> "xla", "tpu", "gpu" or "interpret" (the TPU kernel in Pallas interpret mode).

    auto: the Pallas kernel on TPU and GPU, XLA on CPU (Pallas does not compile for CPU).
    pallas: the kernel of the default backend; on CPU its TPU kernel in interpret mode (slow: for tests).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown {op} implementation {implementation!r}; valid: {IMPLEMENTATIONS}")
    platform = jax.default_backend()
    if implementation == "xla" or (implementation == "auto" and platform not in ("tpu", "gpu")):
        return "xla"
    return platform if platform in ("tpu", "gpu") else "interpret"
