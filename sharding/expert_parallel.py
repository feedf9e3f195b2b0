"""Expert parallelism, and the grouped expert pieces every MoE path shares.

The MoE (lite.moe) has one per-device function: route the local tokens, run the experts through a
dispatch, add the zero experts' identity term, count. Without a mesh it is called directly; on a mesh
`moe_on_mesh` wraps exactly that function in one `jax.shard_map`. Every mesh axis splits the tokens;
the `expert` axis also splits the FFN experts (E / n_ep per device). Inside the shard_map each device
routes its own tokens (router in fp32, replicated), sends each (token, FFN expert) slot to the device
that owns the expert, runs its local experts as one grouped matmul per projection
(`pallas_kernels.ragged_matmul`), and sends the results back. This module takes the per-device
function and the weight arrays as arguments, so it needs nothing from lite.

Dispatches (`ModelConfig.expert_dispatch`):
  capacity  `all_to_all` of fixed-size buffers [E, C, D]: C slots per (source device, expert),
            C = ceil(expert_capacity_factor * T_local * target_ffn_experts_per_token / E), at most
            T_local. Slots past C are dropped (the token keeps its other experts and the
            zero-expert term) and counted. Runs everywhere, CPU included.
  ragged    `ragged_all_to_all` of exactly the routed rows. The receive buffer holds the worst case
            (dropless) or, with `ragged_buffer_factor` > 0, B = ceil(ragged_buffer_factor * T_local *
            target_ffn_experts_per_token) rows, the balanced load times the factor (MaxText's
            name); rows past B are dropped and counted like capacity drops: each device fills its
            buffer from source devices in order, each source's rows ordered by local expert, then
            token. XLA:CPU cannot run it; TPU and GPU can.
  auto      ragged when compiling for TPU or GPU, capacity elsewhere.

Inference never drops: `LongcatModel.prefill` and `decode_step` trace under `dropless()`, which
sizes both dispatches for the worst case (capacity C = T_local; the ragged buffer unbounded), so
the factors only bound the training step's buffers.

The grouped pieces (`sort_by_expert`, `unsort`, `grouped_swiglu`, `weighted_slot_sum`) live here,
below the model, because both the single-device grouped FFN (lite.moe.grouped_experts) and the two
dispatches use them, and sharding/ may not import lite.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.backend import target_platform
from pallas_kernels.ragged_matmul import ragged_matmul
from sharding.mesh import axis_size, batch_axes

ragged_all_to_all = jax.lax.ragged_all_to_all  # module attribute: tests swap in a CPU emulation


class ExpertsOutput(NamedTuple):
    """What an expert computation (a dispatch) gives back to the MoE, per device."""

    combined: jax.Array  # float32[T, D]: per token, the routing-weighted sum of its FFN experts' outputs
    dropped_slots: jax.Array  # float32[]: FFN slots not served for expert capacity


# A dispatch: (x [T, D], chosen int32[T, k], weights float32[T, k], token_mask bool[T],
#              w_gate [E_loc, D, I], w_up [E_loc, D, I], w_down [E_loc, I, D]) -> ExpertsOutput
#              (a dispatch made for a layer takes every layer's weights, [L, E_loc, ., .]).
# Expert ids >= E (zero experts) contribute nothing to `combined`.
ExpertsFn = Callable[..., ExpertsOutput]


# ---------------------------------------------------------------------------------------------
# Grouped rows: sort by expert, one grouped matmul per projection, unsort, weigh.

class ExpertOrder(NamedTuple):
    """The stable sort that makes rows with the same key contiguous."""

    order: jax.Array  # int32[M]: row r of the sorted buffer is row order[r] of the unsorted one
    group_sizes: jax.Array  # int32[G]: sorted rows per group; rows with keys >= G come after every group


def sort_by_expert(keys: jax.Array, num_groups: int) -> ExpertOrder:
    """keys int32[M] (each row's group; >= num_groups: in no group, e.g. a zero expert) -> ExpertOrder."""
    order = jnp.argsort(keys, stable=True)
    # segment_sum drops keys outside [0, num_groups): those rows sort last and fall outside every group.
    group_sizes = jax.ops.segment_sum(jnp.ones_like(keys), keys, num_segments=num_groups)
    return ExpertOrder(order, group_sizes)


def unsort(sorted_rows: jax.Array, order: jax.Array) -> jax.Array:
    """The inverse of `rows[order]`: sorted_rows [M, ...] -> [M, ...] in the unsorted order. A gather
    through the inverse permutation (a scatter of M ints), not a scatter of the rows themselves."""
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return sorted_rows[inverse]


def grouped_swiglu(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, layer: int | None = None) -> jax.Array:
    """rows [M, D] sorted by group, group_sizes int32[G], w_gate/w_up [G, D, I], w_down [G, I, D]
    -> [M, D]: each row through its group's SwiGLU. Rows past sum(group_sizes) are left undefined
    (a kernel may not write them). layer: the weights are every layer's, stacked [L, G, ., .]
    (decode), and the grouped matmuls read layer `layer` in place."""
    matmul = functools.partial(ragged_matmul, group_sizes=group_sizes, layer=layer)
    hidden = jax.nn.silu(matmul(rows, w_gate)) * matmul(rows, w_up)
    return matmul(hidden, w_down)


def weighted_slot_sum(per_slot: jax.Array, served: jax.Array, weights: jax.Array) -> jax.Array:
    """per_slot [T*k, D] (slot order: token-major), served bool[T*k], weights float32[T, k] -> float32[T, D]:
    sum over each token's served slots of weight * row. `where` before the multiply: unserved rows
    may be undefined (see `grouped_swiglu`) and must reach neither the output nor the weights' gradient."""
    rows = jnp.where(served[:, None], per_slot.astype(jnp.float32), 0.0) * weights.reshape(-1)[:, None]
    return rows.reshape(*weights.shape, -1).sum(axis=1)


# ---------------------------------------------------------------------------------------------
# The MoE on a mesh.

_TRACING = threading.local()  # .dropless: set while tracing under `dropless()`


@contextlib.contextmanager
def dropless_context() -> Iterator[None]:
    """While tracing inside it, every dispatch is sized for the worst case and drops nothing."""
    before = getattr(_TRACING, "dropless", False)
    _TRACING.dropless = True
    try:
        yield
    finally:
        _TRACING.dropless = before


def dropless(function: Callable) -> Callable:
    """Decorator: `function` traces its MoE layers under `dropless_context()` (inference steps)."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with dropless_context():
            return function(*args, **kwargs)
    return wrapped


def is_dropless() -> bool:
    return getattr(_TRACING, "dropless", False)


def expert_capacity(num_local_tokens: int, cfg) -> int:
    """Slots each device may send to each FFN expert: the balanced load at the target number of FFN
    experts per token, times `cfg.expert_capacity_factor`; never more than the tokens that could come
    (all of them under `dropless()`).
    cfg: a lite ModelConfig (read for n_routed_experts, target_ffn_experts_per_token and the factor)."""
    if is_dropless():
        return num_local_tokens
    balanced = num_local_tokens * cfg.target_ffn_experts_per_token / cfg.n_routed_experts
    return max(1, min(num_local_tokens, math.ceil(cfg.expert_capacity_factor * balanced)))


def ragged_buffer_rows(num_local_tokens: int, n_ep: int, cfg) -> int:
    """Rows of a device's ragged receive buffer: the worst case, n_ep * T_local * moe_topk (every
    device sends every slot here), or with `cfg.ragged_buffer_factor` > 0 (and not under
    `dropless()`) the balanced load T_local * target_ffn_experts_per_token times the factor."""
    worst = n_ep * num_local_tokens * cfg.moe_topk
    if is_dropless() or not cfg.ragged_buffer_factor:
        return worst
    balanced = num_local_tokens * cfg.target_ffn_experts_per_token
    return max(1, min(worst, math.ceil(cfg.ragged_buffer_factor * balanced)))


def resolve_dispatch(dispatch: str) -> str:
    """"auto" | "capacity" | "ragged" -> "capacity" or "ragged". auto: ragged when compiling for TPU
    or GPU (`pallas_kernels.backend.target_platform`: the ambient mesh's devices), capacity elsewhere
    (XLA:CPU has no ragged_all_to_all)."""
    if dispatch == "auto":
        return "ragged" if target_platform() in ("tpu", "gpu") else "capacity"
    if dispatch not in ("capacity", "ragged"):
        raise ValueError(f"expert dispatch must be auto, capacity or ragged, got {dispatch!r}")
    return dispatch


def moe_on_mesh(moe_per_device: Callable, router_weights: Any, expert_weights: Any, u: jax.Array,
                token_mask: jax.Array | None, mesh, cfg,
                layer: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The MoE on `mesh` (the ambient one, `jax.set_mesh`), as one shard_map of `moe_per_device`.

    moe_per_device(router_weights, expert_weights, u [T_loc, D], token_mask bool[T_loc], dispatch)
        -> (out [T_loc, D], float32[E + Z] routed slots per expert, float32[] dropped slots); dispatch
        is an `ExpertsFn`, or None when every expert is on the device (mesh without an expert axis).
    router_weights: a pytree of arrays, replicated. expert_weights: a pytree of [E, ...] arrays, split
        over `expert` on their leading axis; with `layer`, every layer's stacked, [L, E, ...], split on
        the E axis, and the dispatch's grouped matmuls read layer `layer` out of the stack in place.
    u [T, D], token_mask bool[T] or None; T split over every mesh axis.
    cfg: a lite ModelConfig (n_routed_experts, target_ffn_experts_per_token, expert_dispatch,
        expert_capacity_factor).
    -> (out [T, D], counts float32[E + Z] and dropped float32[], both summed over the devices).
    """
    n_ep = axis_size(mesh, "expert")
    if cfg.n_routed_experts % n_ep:
        raise ValueError(f"{cfg.n_routed_experts} FFN experts cannot be split over the mesh's expert axis "
                         f"of size {n_ep}; choose an expert axis size that divides n_routed_experts")
    axes = batch_axes(mesh)
    devices = math.prod(mesh.shape[a] for a in axes)
    if u.shape[0] % devices:
        raise ValueError(f"{u.shape[0]} tokens cannot be split evenly over the {devices} devices of mesh "
                         f"{dict(mesh.shape)}; make the batch a multiple of {devices}")
    if token_mask is None:
        token_mask = jnp.ones(u.shape[:1], bool)
    dispatch = _dispatch(cfg, n_ep, local_tokens=u.shape[0] // devices, layer=layer)
    tokens = P(axes)
    router_specs = jax.tree.map(lambda _: P(), router_weights)
    expert_spec = P() if n_ep == 1 else P("expert") if layer is None else P(None, "expert")
    expert_specs = jax.tree.map(lambda _: expert_spec, expert_weights)

    def local(router_weights, expert_weights, u, token_mask):
        out, counts, dropped = moe_per_device(router_weights, expert_weights, u, token_mask, dispatch)
        return out, jax.lax.psum(counts, axes), jax.lax.psum(dropped, axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(router_specs, expert_specs, tokens, tokens),
                         out_specs=(tokens, P(), P()))(router_weights, expert_weights, u, token_mask)


def _dispatch(cfg, n_ep: int, local_tokens: int, layer: int | None) -> ExpertsFn | None:
    if n_ep == 1:
        return None  # every expert is local: the single-device experts on this device's tokens
    if resolve_dispatch(cfg.expert_dispatch) == "capacity":
        return functools.partial(_capacity_dispatch, num_experts=cfg.n_routed_experts,
                                 capacity=expert_capacity(local_tokens, cfg), layer=layer)
    return functools.partial(_ragged_dispatch, num_experts=cfg.n_routed_experts,
                             buffer_rows=ragged_buffer_rows(local_tokens, n_ep, cfg), layer=layer)


def _slot_keys(chosen: jax.Array, token_mask: jax.Array, num_experts: int) -> jax.Array:
    """int32[T*k]: the FFN expert of each (token, slot), or num_experts for zero experts / padding
    (padding is never sent to the experts)."""
    top_k = chosen.shape[1]
    valid = jnp.repeat(token_mask.astype(bool), top_k)
    flat = chosen.reshape(-1)
    return jnp.where(valid & (flat < num_experts), flat, num_experts)


def _capacity_dispatch(x, chosen, weights, token_mask, w_gate, w_up, w_down, *, num_experts: int,
                       capacity: int, layer: int | None = None) -> ExpertsOutput:
    """An `ExpertsFn` inside the shard_map: fixed buffers of `capacity` slots per (device, expert)."""
    num_tokens, top_k = chosen.shape
    n_ep = jax.lax.axis_size("expert")
    local_experts = w_gate.shape[-3]
    slots, d = num_tokens * top_k, x.shape[1]
    keys = _slot_keys(chosen, token_mask, num_experts)
    by_expert = sort_by_expert(keys, num_experts)
    starts = jnp.cumsum(by_expert.group_sizes) - by_expert.group_sizes
    # Position of each slot among its expert's slots, in (token, slot) order: earlier tokens win.
    # (Zero-expert and padding slots get a meaningless position: they are never kept.)
    position = unsort(jnp.arange(slots, dtype=keys.dtype) - starts[keys[by_expert.order]], by_expert.order)
    is_ffn = keys < num_experts
    kept = is_ffn & (position < capacity)
    dropped = jnp.sum(is_ffn & ~kept).astype(jnp.float32)
    dest = jnp.where(kept, keys * capacity + position, num_experts * capacity)  # out of range: not written
    send = jnp.zeros((num_experts * capacity, d), x.dtype).at[dest].set(
        x[jnp.arange(slots) // top_k], mode="drop")  # [E*C, D], expert-major = destination-major
    recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # [n_src * E_loc * C, D]
    grouped = recv.reshape(n_ep, local_experts, capacity, d).transpose(1, 0, 2, 3).reshape(-1, d)
    group_sizes = jnp.full((local_experts,), n_ep * capacity, jnp.int32)
    y = grouped_swiglu(grouped, group_sizes, w_gate, w_up, w_down, layer)
    y = y.reshape(local_experts, n_ep, capacity, d).transpose(1, 0, 2, 3).reshape(-1, d)
    back = jax.lax.all_to_all(y, "expert", 0, 0, tiled=True)  # [E*C, D] in this device's layout
    per_slot = back[jnp.minimum(dest, num_experts * capacity - 1)]  # [T*k, D]
    return ExpertsOutput(weighted_slot_sum(per_slot, kept, weights), dropped)


def _ragged_dispatch(x, chosen, weights, token_mask, w_gate, w_up, w_down, *, num_experts: int,
                     buffer_rows: int, layer: int | None = None) -> ExpertsOutput:
    """An `ExpertsFn` inside the shard_map, receiving at most `buffer_rows` rows per device.

    Slots sorted by expert are contiguous per destination device; `ragged_all_to_all` moves those
    rows, each source's block landing after the blocks of the sources before it. Rows that would
    land past `buffer_rows` are cut from the end of their block (so the last sources, and in a
    block the last local experts, lose first) and counted as dropped. Received rows come grouped by
    source, then local expert; they are sorted by local expert for the grouped matmul, unsorted,
    and sent back along the reverse route.
    """
    num_tokens, top_k = chosen.shape
    n_ep = jax.lax.axis_size("expert")
    me = jax.lax.axis_index("expert")
    local_experts = w_gate.shape[-3]
    slots, d = num_tokens * top_k, x.shape[1]
    keys = _slot_keys(chosen, token_mask, num_experts)
    by_expert = sort_by_expert(keys, num_experts)
    rows = x[by_expert.order // top_k]  # [T*k, D]: FFN slots by expert, then zero-expert/padding slots
    sent = jax.lax.all_gather(by_expert.group_sizes.reshape(n_ep, local_experts), "expert")  # [src, dst, E_loc]
    wanted = sent.sum(-1)  # [src, dst] rows each source has for each destination
    # Destination dst's buffer takes the sources in order: source s's block starts where the blocks
    # of sources < s end, and whatever lies past buffer_rows is cut.
    ends = jnp.minimum(jnp.cumsum(wanted, axis=0), buffer_rows)  # [src, dst]
    starts = jnp.minimum(jnp.cumsum(wanted, axis=0) - wanted, buffer_rows)
    sent_to = ends - starts  # [src, dst] rows actually moved
    send_sizes = sent_to[me]
    input_offsets = jnp.cumsum(wanted[me]) - wanted[me]  # my block for each dst, in my sorted rows
    output_offsets = starts[me]  # where my rows land at each dst
    recv_sizes = sent_to[:, me]
    recv = ragged_all_to_all(rows, jnp.zeros((buffer_rows, d), x.dtype), input_offsets, send_sizes,
                             output_offsets, recv_sizes, axis_name="expert")
    # Local expert of each received row: blocks (source, local expert) in that order, each source's
    # block cut to what it sent.
    before = jnp.cumsum(sent[:, me, :], axis=1) - sent[:, me, :]  # [src, E_loc] rows ahead in the block
    block_sizes = jnp.clip(recv_sizes[:, None] - before, 0, sent[:, me, :]).reshape(-1)  # [n_src * E_loc]
    block = jnp.repeat(jnp.arange(n_ep * local_experts), block_sizes, total_repeat_length=buffer_rows)
    received = jnp.arange(buffer_rows) < jnp.sum(block_sizes)
    by_local_expert = sort_by_expert(jnp.where(received, block % local_experts, local_experts), local_experts)
    y = grouped_swiglu(recv[by_local_expert.order], by_local_expert.group_sizes, w_gate, w_up, w_down, layer)
    y = jnp.where(received[:, None], unsort(y, by_local_expert.order), 0)  # (source, local expert) blocks
    # Reverse route: my block from source s goes back to where s took it from.
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    source_offsets = jnp.cumsum(wanted, axis=1)[:, me] - wanted[:, me]  # [src]: input_offsets of each source
    back = ragged_all_to_all(y, jnp.zeros((slots, d), y.dtype), recv_offsets, recv_sizes,
                             source_offsets, send_sizes, axis_name="expert")  # [T*k, D] sorted order
    # A sorted row was served when it lies within the part of its destination's block that was sent.
    is_ffn_sorted = keys[by_expert.order] < num_experts
    destination = jnp.minimum(keys[by_expert.order] // local_experts, n_ep - 1)
    position = jnp.arange(slots) - input_offsets[destination]
    served_sorted = is_ffn_sorted & (position < send_sizes[destination])
    served = unsort(served_sorted, by_expert.order)
    dropped = jnp.sum(is_ffn_sorted & ~served_sorted).astype(jnp.float32)
    combined = weighted_slot_sum(unsort(back, by_expert.order), served, weights)
    return ExpertsOutput(combined, dropped)
