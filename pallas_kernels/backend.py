"""What every op in this package shares: the one rule for `implementation="auto" | "pallas" | "xla"`,
and the typing a Pallas call needs inside `jax.shard_map`.

Kernel choice follows the devices the computation is compiled for, not the process's default
backend: a CPU machine compiling for a TPU pod or an H200 node (lite.plan, AOT) must get the
accelerator's kernels, and a real accelerator host running a CPU mesh must not.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax

IMPLEMENTATIONS = ("auto", "pallas", "xla")  # what a caller asks for
BACKENDS = ("xla", "xla-tiled", "tpu", "gpu", "interpret", "gpu-interpret")  # what `choose` returns
# What `auto` runs for each op where no Pallas kernel compiles (CPU). "xla" is the op's reference;
# "xla-tiled" is the grouped matmul tiled like the kernels in plain XLA (ragged_matmul/xla_tiled.py),
# because XLA:CPU's ragged_dot does g times the work.
XLA_FALLBACK = {"ngram_gather": "xla", "ragged_matmul": "xla-tiled"}
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("pallas_kernels_forced", default=None)


def target_platform() -> str:
    """"tpu", "gpu" or "cpu": the platform of the ambient mesh's devices (`jax.set_mesh`, also inside
    a shard_map), else of JAX's default device (`jax_default_device`, e.g. a compile-only topology
    device), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None) if not mesh.empty else None
    platform = getattr(device, "platform", None)
    if platform is None:
        default = jax.config.jax_default_device
        platform = getattr(default, "platform", None) if default is not None and not isinstance(default, str) \
            else default
    platform = (platform or jax.default_backend()).lower()
    return "gpu" if platform in _GPU_PLATFORMS else platform


def choose(op: str, implementation: str) -> str:
    """-> one of BACKENDS for `op` (a key of XLA_FALLBACK): "xla" (the reference), "xla-tiled",
    "tpu", "gpu", "interpret" (the TPU kernel in Pallas interpret mode) or "gpu-interpret" (the
    Triton kernel in interpret mode).

    auto: the Pallas kernel of the target platform on TPU and GPU, the op's XLA_FALLBACK elsewhere
        (Pallas does not compile for CPU); inside `forced(backend)`, that backend instead.
    pallas: the target's kernel; on CPU its TPU kernel in interpret mode (slow: for tests).
    xla: the op's XLA reference, on every platform.
    """
    if op not in XLA_FALLBACK:
        raise ValueError(f"unknown op {op!r}; valid: {tuple(XLA_FALLBACK)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown {op} implementation {implementation!r}; valid: {IMPLEMENTATIONS}")
    if implementation == "auto" and _forced.get() is not None:
        return _forced.get()
    if implementation == "xla":
        return "xla"
    platform = target_platform()
    if platform in ("tpu", "gpu"):
        return platform
    return XLA_FALLBACK[op] if implementation == "auto" else "interpret"


@contextlib.contextmanager
def forced(backend: str) -> Iterator[None]:
    """Make `implementation="auto"` mean `backend` (one of BACKENDS) for whatever is traced inside,
    e.g. `with forced("interpret"):` runs the whole model's TPU kernels in interpret mode on CPU.

    A trace-time setting, like `pltpu.force_tpu_interpret_mode`: a function jitted and traced
    before keeps the choice it was traced with.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; valid: {BACKENDS}")
    token = _forced.set(backend)
    try:
        yield
    finally:
        _forced.reset(token)


# ---------------------------------------------------------------------------------------------
# Inside jax.shard_map with check_vma=True every value carries the mesh axes it varies over, and a
# Pallas call states its outputs' explicitly. The ops here give their inputs one common type first
# (`same_varying_axes`): every output then varies over the union, and a custom VJP's cotangents
# have their primals' types by construction; JAX transposes the `pcast` into the psum over the axes
# a replicated input did not vary on (e.g. an expert weight used by every data shard's tokens).

def same_varying_axes(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The arrays, each cast to vary over the union of the mesh axes any of them varies over."""
    union = frozenset().union(*(_varying(a) for a in arrays))
    return tuple(jax.lax.pcast(a, tuple(sorted(union - _varying(a))), to="varying") for a in arrays)


def out_struct(shape: Sequence[int], dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """A Pallas out_shape that varies over the same mesh axes as `like` (an input of the call)."""
    return jax.ShapeDtypeStruct(tuple(shape), dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def _varying(a: jax.Array) -> frozenset:
    return frozenset(jax.typeof(a).manual_axis_type.varying)

