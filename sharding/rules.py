"""Logical axis names for every parameter and activation, and the rules mapping them to mesh axes.

Two tables, one place each:
  PARAM_AXES       parameter path pattern -> logical axis names, one per dimension (the leading
                   [num_layers] axis of the scanned stack included)
  LOGICAL_TO_MESH  logical axis name -> mesh axes it is split over (absent axes are skipped)
Activations use the same logical names (ACTIVATION_AXES). A dimension that the mesh axes do not
divide stays whole (replicated) on those axes, dropping mesh axes from the right until they
divide, so every preset runs on every mesh; `describe_param_shardings` shows what happened.
"""

from __future__ import annotations

import math
import re

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sharding.mesh import MESH_AXES

# Path patterns are matched with re.fullmatch against "a/b/c" (first match wins).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed/token_table", ("vocab", "embed")),
    (r"embed/ngram_table", ("ngram_rows", "ngram_width")),
    (r"embed/ngram_proj", ("ngram_tables", "ngram_width", "embed")),
    (r"embed/amplification_norm/.*", ("norm",)),
    (r"layers/attns/\d+/q_a_proj/kernel", ("layers", "embed", "q_lora")),
    (r"layers/attns/\d+/q_b_proj/kernel", ("layers", "q_lora", "heads")),
    (r"layers/attns/\d+/kv_a_proj/kernel", ("layers", "embed", "kv_lora")),
    (r"layers/attns/\d+/kv_b_proj/kernel", ("layers", "kv_lora", "heads")),
    (r"layers/attns/\d+/o_proj/kernel", ("layers", "heads", "embed")),
    (r"layers/attns/\d+/(q_a|kv_a)_norm/weight", ("layers", "norm")),
    (r"layers/(attn|mlp)_norms/\d+/weight", ("layers", "norm")),
    (r"layers/mlps/\d+/(gate|up)_proj/kernel", ("layers", "embed", "mlp")),
    (r"layers/mlps/\d+/down_proj/kernel", ("layers", "mlp", "embed")),
    (r"layers/moe/router/classifier", ("layers", "router_in", "router_experts")),
    (r"layers/moe/router/bias", ("layers", "router_experts")),
    (r"layers/moe/w_(gate|up)", ("layers", "experts", "embed", "expert_mlp")),
    (r"layers/moe/w_down", ("layers", "experts", "expert_mlp", "embed")),
    (r"final_norm/weight", ("norm",)),
    (r"lm_head/kernel", ("embed", "vocab")),
)

LOGICAL_TO_MESH: dict[str, tuple[str, ...]] = {
    # Parameters.
    "embed": ("fsdp",),  # the model dimension of dense weights (and of the experts' weights)
    "experts": ("expert",),
    "ngram_rows": MESH_AXES,  # the 31.4B-parameter table: rows over every device
    # Activations: every mesh axis splits the batch (tokens flattened from it).
    "batch": MESH_AXES,
    "tokens": MESH_AXES,
    # Not split: layers (scanned), vocab, heads, LoRA ranks, mlp widths, router, norms, ngram width.
}

ACTIVATION_AXES: dict[str, tuple[str | None, ...]] = {
    "tokens_in": ("batch", "length"),  # int32 tokens / segment ids / positions [B, L]
    "hidden": ("batch", "length", None),  # [B, L, D]
    "logits": ("batch", "length", None),  # [B, L, V]
    "moe_in": ("tokens", None),  # [T, D] flattened tokens entering the MoE shard_map
    "ngram_ids": ("tokens", None),  # [T, S] flat rows entering the N-gram gather
    "decode_tokens": ("batch",),  # [B] one new token per sequence
    "ngram_cache": ("batch", None),  # [B, N-1]
}


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    for pattern, axes in PARAM_AXES:
        if re.fullmatch(pattern, path):
            if len(axes) != ndim:
                raise ValueError(f"rule {pattern!r} gives {len(axes)} logical axes for {path}, which has {ndim} dims")
            return axes
    raise KeyError(f"parameter {path} matches no rule in sharding.rules.PARAM_AXES; add one")


def logical_to_spec(logical: tuple[str | None, ...], shape: tuple[int, ...] | None, mesh) -> P:
    """Logical axes -> PartitionSpec on `mesh`; with a shape, mesh axes that do not divide a
    dimension are dropped from the right until they do. A mesh axis is used at most once."""
    used: set[str] = set()
    entries = []
    for dim, name in enumerate(logical):
        axes = [a for a in LOGICAL_TO_MESH.get(name, ()) if a in mesh.axis_names and a not in used]
        if shape is not None:
            while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
        axes = [a for a in axes if mesh.shape[a] > 1]
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*entries)


def activation_spec(kind: str, mesh, shape: tuple[int, ...] | None = None) -> P:
    return logical_to_spec(ACTIVATION_AXES[kind], shape, mesh)


def _path_string(path) -> str:
    """A key path as "a/b/c" (nnx Variables add a trailing attribute key, which is dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            continue
        parts.append(str(k.key if hasattr(k, "key") else k.idx if hasattr(k, "idx") else k))
    return "/".join(parts)


def state_specs(state, mesh):
    """A pytree of PartitionSpecs matching a pytree whose leaves sit under nnx parameter paths: a
    model State, or optimizer state (its mu/nu trees end in the same paths; scalars replicate)."""
    def spec(path, leaf):
        parts = _path_string(path).split("/")
        for start in range(len(parts)):
            suffix = "/".join(parts[start:])
            if any(re.fullmatch(pattern, suffix) for pattern, _ in PARAM_AXES):
                return logical_to_spec(param_logical_axes(suffix, leaf.ndim), tuple(leaf.shape), mesh)
        if leaf.ndim == 0:
            return P()
        raise KeyError(f"{'/'.join(parts)} {tuple(leaf.shape)} matches no rule in sharding.rules.PARAM_AXES")

    return jax.tree_util.tree_map_with_path(spec, state)


def state_shardings(state, mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def shard_model(model: nnx.Module, mesh) -> nnx.Module:
    """Place a model's variables on `mesh` by the rules (in place); returns the model."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    return model


def describe_param_shardings(state, mesh) -> list[tuple[str, tuple[int, ...], P]]:
    """(path, shape, spec) for every variable: what the rules did on this mesh."""
    specs = state_specs(state, mesh)
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    flat_state = jax.tree_util.tree_leaves_with_path(state)
    return [(_path_string(path), tuple(leaf.shape), spec)
            for (path, leaf), (_, spec) in zip(flat_state, flat_specs)]
