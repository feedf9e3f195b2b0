"""Expert parallelism: the whole routed computation of an MoE inside one `jax.shard_map`.

Every mesh axis splits the tokens; the `expert` axis also splits the FFN experts (E / n_ep per
device). Inside the shard_map each device routes its own tokens (router in fp32, replicated), sends
each (token, FFN expert) slot to the device that owns the expert, runs its local experts as one
grouped matmul per projection (`pallas_kernels.ragged_matmul`), sends the results back, and
combines them with the zero experts' identity term exactly as `lite.moe.MoE.forward` does (it IS
that method, with the expert FFN swapped for a dispatching one).

Two dispatches:
  capacity  `all_to_all` of fixed-size buffers [E, C, D]: C slots per (source device, expert),
            C = ceil(capacity_factor * T_local * target_ffn_experts_per_token / E), at most
            T_local. Slots past C are dropped (the token keeps its other experts and the
            zero-expert term) and counted. Runs everywhere, CPU included.
  ragged    `ragged_all_to_all` of exactly the routed rows, into a receive buffer sized for the
            worst case (dropless). XLA:CPU cannot run it; TPU and GPU can.
"auto" picks ragged on TPU/GPU meshes and capacity elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from pallas_kernels.ragged_matmul import ragged_matmul
from sharding.mesh import axis_size, batch_axes

DISPATCHES = ("auto", "capacity", "ragged")
ragged_all_to_all = jax.lax.ragged_all_to_all  # module attribute: tests swap in a CPU reference


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """How the MoE dispatches on a mesh with an `expert` axis (a static attribute of each MoE)."""

    dispatch: str = "auto"
    capacity_factor: float = 2.0

    def __post_init__(self):
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"expert dispatch must be one of {DISPATCHES}, got {self.dispatch!r}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")


def set_expert_parallel(model: nnx.Module, settings: ExpertParallel) -> nnx.Module:
    """Attach dispatch settings to every MoE of a model (static: part of the graph definition)."""
    from lite.moe import MoE

    for _, module in nnx.iter_modules(model):
        if isinstance(module, MoE):
            module.expert_parallel = settings
    return model


def expert_capacity(num_local_tokens: int, cfg, capacity_factor: float) -> int:
    """Slots each device may send to each FFN expert: the balanced load at the target number of
    FFN experts per token, times the factor; never more than the tokens that could come."""
    balanced = num_local_tokens * cfg.target_ffn_experts_per_token / cfg.n_routed_experts
    return max(1, min(num_local_tokens, math.ceil(capacity_factor * balanced)))


def resolve_dispatch(dispatch: str, mesh) -> str:
    if dispatch != "auto":
        return dispatch
    platform = getattr(getattr(mesh, "abstract_device", None), "platform", None)
    if platform is None:  # a concrete Mesh
        platform = mesh.devices.flat[0].platform
    return "ragged" if platform in ("tpu", "gpu", "cuda", "rocm") else "capacity"


def moe_on_mesh(moe, u: jax.Array, token_mask: jax.Array | None, mesh) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`moe.forward` on a mesh: u [T, D] (T split over every mesh axis), token_mask bool[T] or None
    -> (out [T, D], float32[E + Z] routed slots per expert, float32[] slots dropped for capacity)."""
    cfg = moe.cfg
    settings = getattr(moe, "expert_parallel", None) or ExpertParallel()
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
    dispatch = resolve_dispatch(settings.dispatch, mesh)
    local_tokens = u.shape[0] // devices
    if n_ep == 1:
        expert_fn = None  # every expert is local: the single-device FFN on this device's tokens
    elif dispatch == "capacity":
        expert_fn = functools.partial(_capacity_experts, num_experts=cfg.n_routed_experts,
                                      capacity=expert_capacity(local_tokens, cfg, settings.capacity_factor))
    else:
        expert_fn = functools.partial(_ragged_experts, num_experts=cfg.n_routed_experts)

    graphdef, state = nnx.split(moe)
    expert_spec = P("expert") if n_ep > 1 else P()
    state_spec = jax.tree_util.tree_map_with_path(
        lambda path, _: expert_spec if any(getattr(k, "key", None) in ("w_gate", "w_up", "w_down") for k in path)
        else P(), state)
    tokens = P(axes)

    def local(state, u, token_mask):
        out, counts, dropped = nnx.merge(graphdef, state).forward(u, token_mask, expert_fn=expert_fn)
        return out, jax.lax.psum(counts, axes), jax.lax.psum(dropped, axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(state_spec, tokens, tokens),
                         out_specs=(tokens, P(), P()))(state, u, token_mask)


def _swiglu_experts(rows: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                    group_sizes: jax.Array) -> jax.Array:
    """rows [M, D] grouped by local expert -> [M, D]: the SwiGLU of each row's expert."""
    hidden = jax.nn.silu(ragged_matmul(rows, w_gate, group_sizes)) * ragged_matmul(rows, w_up, group_sizes)
    return ragged_matmul(hidden, w_down, group_sizes)


def _slot_keys(chosen: jax.Array, token_mask: jax.Array, num_experts: int) -> jax.Array:
    """int32[T*k]: the FFN expert of each (token, slot), or num_experts for zero experts / padding."""
    top_k = chosen.shape[1]
    valid = jnp.repeat(token_mask.astype(bool), top_k)
    flat = chosen.reshape(-1)
    return jnp.where(valid & (flat < num_experts), flat, num_experts)


def _capacity_experts(x, chosen, weights, token_mask, w_gate, w_up, w_down, *, num_experts: int,
                      capacity: int) -> tuple[jax.Array, jax.Array]:
    """Local view inside the shard_map: x [T, D], chosen/weights [T, k], token_mask [T], local
    expert weights [E_loc, ...] -> (float32[T, D] weighted FFN sum, float32[] dropped slots)."""
    num_tokens, top_k = chosen.shape
    n_ep = jax.lax.axis_size("expert")
    local_experts = w_gate.shape[0]
    slots = num_tokens * top_k
    key = _slot_keys(chosen, token_mask, num_experts)
    # Position of each slot among its expert's slots, in (token, slot) order: earlier tokens win.
    order = jnp.argsort(key, stable=True)
    sizes = jax.ops.segment_sum(jnp.ones_like(key), key, num_segments=num_experts + 1)
    starts = jnp.cumsum(sizes) - sizes
    position = jnp.zeros_like(key).at[order].set(jnp.arange(slots, dtype=key.dtype) - starts[key[order]])
    is_ffn = key < num_experts
    kept = is_ffn & (position < capacity)
    dropped = jnp.sum(is_ffn & ~kept).astype(jnp.float32)
    dest = jnp.where(kept, key * capacity + position, num_experts * capacity)  # out of range: not written
    send = jnp.zeros((num_experts * capacity, x.shape[1]), x.dtype).at[dest].set(
        x[jnp.arange(slots) // top_k], mode="drop")  # [E*C, D], expert-major = destination-major
    recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # [n_src * E_loc * C, D]
    d = x.shape[1]
    grouped = recv.reshape(n_ep, local_experts, capacity, d).transpose(1, 0, 2, 3).reshape(-1, d)
    group_sizes = jnp.full((local_experts,), n_ep * capacity, jnp.int32)
    y = _swiglu_experts(grouped, w_gate, w_up, w_down, group_sizes)
    y = y.reshape(local_experts, n_ep, capacity, d).transpose(1, 0, 2, 3).reshape(-1, d)
    back = jax.lax.all_to_all(y, "expert", 0, 0, tiled=True)  # [E*C, D] in this device's layout
    per_slot = back[jnp.minimum(dest, num_experts * capacity - 1)].astype(jnp.float32)
    per_slot = jnp.where(kept[:, None], per_slot * weights.reshape(-1)[:, None], 0.0)
    return per_slot.reshape(num_tokens, top_k, d).sum(axis=1), dropped


def _ragged_experts(x, chosen, weights, token_mask, w_gate, w_up, w_down, *,
                    num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Dropless local view inside the shard_map (same contract as `_capacity_experts`).

    Slots sorted by expert are contiguous per destination device; `ragged_all_to_all` moves
    exactly those rows. Received rows come grouped by source, then local expert; they are sorted
    by local expert for the grouped matmul, unsorted, and sent back along the reverse route.
    """
    num_tokens, top_k = chosen.shape
    n_ep = jax.lax.axis_size("expert")
    me = jax.lax.axis_index("expert")
    local_experts = w_gate.shape[0]
    slots, d = num_tokens * top_k, x.shape[1]
    key = _slot_keys(chosen, token_mask, num_experts)
    order = jnp.argsort(key, stable=True)
    rows = x[order // top_k]  # [T*k, D]: FFN slots by expert, then zero-expert/padding slots
    per_expert = jax.ops.segment_sum(jnp.ones_like(key), key, num_segments=num_experts + 1)[:num_experts]
    sent = jax.lax.all_gather(per_expert.reshape(n_ep, local_experts), "expert")  # [src, dst, E_loc]
    sent_to = sent.sum(-1)  # [src, dst] rows
    send_sizes = sent_to[me]
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    below_me = (jnp.arange(n_ep) < me)[:, None]
    output_offsets = jnp.sum(jnp.where(below_me, sent_to, 0), axis=0)  # where my rows land at each dst
    recv_sizes = sent_to[:, me]
    capacity = n_ep * slots  # worst case: every device sends every slot here
    recv = ragged_all_to_all(rows, jnp.zeros((capacity, d), x.dtype), input_offsets, send_sizes,
                             output_offsets, recv_sizes, axis_name="expert")
    # Local expert of each received row: blocks (source, local expert) in that order.
    block_sizes = sent[:, me, :].reshape(-1)  # [n_src * E_loc]
    block = jnp.repeat(jnp.arange(n_ep * local_experts), block_sizes, total_repeat_length=capacity)
    received = jnp.arange(capacity) < jnp.sum(block_sizes)
    local_key = jnp.where(received, block % local_experts, local_experts)
    local_order = jnp.argsort(local_key, stable=True)
    y = _swiglu_experts(recv[local_order], w_gate, w_up, w_down, sent[:, me, :].sum(0))
    y = jnp.zeros_like(y).at[local_order].set(y)  # back to (source, local expert) blocks
    y = jnp.where(received[:, None], y, 0)
    # Reverse route: my block from source s goes back to where s took it from.
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    source_offsets = jnp.sum(jnp.where(jnp.arange(n_ep)[None, :] < me, sent_to, 0), axis=1)  # [src]
    back = ragged_all_to_all(y, jnp.zeros((slots, d), y.dtype), recv_offsets, recv_sizes,
                             source_offsets, send_sizes, axis_name="expert")  # [T*k, D] sorted order
    is_ffn = key[order] < num_experts
    per_sorted = jnp.where(is_ffn[:, None], back.astype(jnp.float32) * weights.reshape(-1)[order][:, None], 0.0)
    per_slot = jnp.zeros_like(per_sorted).at[order].set(per_sorted)
    return per_slot.reshape(num_tokens, top_k, d).sum(axis=1), jnp.zeros((), jnp.float32)
