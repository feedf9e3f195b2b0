"""The one entry point the model calls; implementations are chosen here, never in the model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import backend as backends
from pallas_kernels import interpret
from pallas_kernels.backend import IMPLEMENTATIONS
from pallas_kernels.ragged_matmul import gpu, tpu
from pallas_kernels.ragged_matmul.metadata import stacked_groups
from pallas_kernels.ragged_matmul.reference import ragged_matmul_reference
from pallas_kernels.ragged_matmul.xla_tiled import tiled_ragged_matmul

__all__ = ["IMPLEMENTATIONS", "ragged_matmul", "kernel_ragged_matmul"]


def ragged_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, group_offset: jax.Array | int | None = None,
                  layer: int | None = None, implementation: str = "auto") -> jax.Array:
    """lhs [m, k] @ rhs[g, k, n] grouped by int32 group_sizes [G] -> [m, n] (see the reference).

    implementation: "xla" is the reference (`jax.lax.ragged_dot`); "auto" runs the Pallas kernel on
    TPU / GPU and the tiled XLA formulation (xla_tiled.py) elsewhere (pallas_kernels.backend.choose).

    group_offset: rhs holds groups group_offset .. group_offset + g - 1 of the G (expert-sharded
    weights); the rows of other groups come out as zeros.

    layer (a static int): rhs is every layer's groups stacked, [L, g, k, n], and the groups of
    rhs[layer] are used. The kernels and the XLA tiled form read them out of the stack in place, so a
    decode step over stacked weights copies none of them; rhs is rounded to lhs.dtype as it is read.
    """
    choice = backends.choose("ragged_matmul", implementation)
    num_local, _, flat = stacked_groups(rhs, layer)  # checks that a layer has a stack to pick from
    groups = (num_local, *flat.shape[1:])  # [g, k, n]
    if lhs.ndim != 2 or len(groups) != 3 or group_sizes.ndim != 1 or lhs.shape[1] != groups[1]:
        raise ValueError(f"ragged_matmul expects lhs [m, k], rhs [g, k, n] (or [L, g, k, n] with layer), "
                         f"group_sizes [G]; got lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    if group_offset is None and group_sizes.shape[0] != groups[0]:
        raise ValueError(f"ragged_matmul: group_sizes has {group_sizes.shape[0]} groups but rhs {groups[0]}; "
                         "pass group_offset when rhs holds a slice of the groups")
    if groups[0] > group_sizes.shape[0]:
        raise ValueError(f"ragged_matmul: rhs has {groups[0]} groups, more than group_sizes' {group_sizes.shape[0]}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"ragged_matmul: group_sizes must be integers, got {group_sizes.dtype}")
    if choice == "xla-tiled":
        return tiled_ragged_matmul(lhs, rhs, group_sizes, group_offset, layer=layer)
    if choice == "xla":
        return ragged_matmul_reference(lhs, rhs, group_sizes, group_offset, layer=layer)
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    return kernel_ragged_matmul(lhs, rhs, group_sizes.astype(jnp.int32), offset, choice, None, layer)


def kernel_ragged_matmul(lhs, rhs, group_sizes, group_offset, backend: str, tiling, layer: int | None = None):
    """The Pallas kernel of `backend` ("tpu", "gpu", "interpret"; "gpu-interpret" for tests), with its VJP:
    d lhs = the same kernel with rhs transposed, d rhs = the grouped transposed matmul (with `layer`,
    placed at that layer of a zero stack: decode, which stacks, takes no gradient).

    Inside a shard_map the operands get one varying type first (backend.same_varying_axes), so the
    VJP's d rhs of replicated weights comes back psum-ed over the token shards by JAX's transpose.
    """
    return _kernel_ragged_matmul(*backends.same_varying_axes(lhs, rhs, group_sizes, group_offset), backend, tiling,
                                 layer)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _kernel_ragged_matmul(lhs, rhs, group_sizes, group_offset, backend: str, tiling, layer):
    gmm, _, kwargs = _kernels(backend)
    return gmm(lhs, rhs, group_sizes, group_offset, tiling=tiling, layer=layer, **kwargs)


def _kernels(backend: str):
    if backend != "tpu" and backend != "gpu":
        interpret.enable()
    kernels = {"tpu": (tpu, {}), "gpu": (gpu, {}), "interpret": (tpu, {"interpret": True}),
               "gpu-interpret": (gpu, {"interpret": True})}
    if backend not in kernels:  # also any InterpretParams: the TPU kernels under the TPU simulator
        return tpu.gmm, tpu.tgmm, {"interpret": backend}
    module, kwargs = kernels[backend]
    return module.gmm, module.tgmm, kwargs


def _forward(lhs, rhs, group_sizes, group_offset, backend, tiling, layer):
    out = _kernel_ragged_matmul(lhs, rhs, group_sizes, group_offset, backend, tiling, layer)
    return out, (lhs, rhs, group_sizes, group_offset)


def _backward(backend, tiling, layer, residuals, d_out):
    lhs, rhs, group_sizes, group_offset = residuals
    gmm, tgmm, kwargs = _kernels(backend)
    d_out = d_out.astype(lhs.dtype)
    d_lhs = gmm(d_out, rhs, group_sizes, group_offset, transpose_rhs=True, tiling=tiling, layer=layer, **kwargs)
    num_local = stacked_groups(rhs, layer)[0]
    d_rhs = tgmm(lhs, d_out, group_sizes, group_offset, num_local=num_local, tiling=tiling, **kwargs).astype(rhs.dtype)
    if layer is not None:
        d_rhs = jnp.zeros_like(rhs).at[layer].set(d_rhs)
    return d_lhs, d_rhs, None, None


_kernel_ragged_matmul.defvjp(_forward, _backward)
