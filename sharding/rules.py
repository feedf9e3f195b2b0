"""Logical axis names -> mesh axes, and the shardings of whole states derived from them.

Every parameter says what its dimensions are where it is created: an nnx Variable metadata entry
`logical_axes` (LOGICAL_AXES), one name per dimension, the leading [num_layers] axis of the scanned
stack included (`lite.layers.param` attaches it). This module maps those names to mesh axes
(LOGICAL_TO_MESH; names absent from it stay whole), for parameters, optimizer state (its mu / nu
trees keep the parameters' Variables and so their metadata) and activations alike. A dimension
that the mesh axes do not divide stays whole (replicated) on those axes, dropping mesh axes from
the right until they divide, so every preset runs on every mesh; `describe_param_shardings` shows
what happened.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sharding.mesh import MESH_AXES

LOGICAL_AXES = "logical_axes"  # the nnx Variable metadata key: tuple of logical axis names, one per dim

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
    "decode_tokens": ("batch",),  # [B] one new token per sequence
}


def variable_axes(path, variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axes a variable was created with (KeyError naming it when it has none)."""
    axes = variable.get_metadata().get(LOGICAL_AXES)
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if axes is None:
        raise KeyError(f"variable {name} {tuple(variable.shape)} has no {LOGICAL_AXES!r} metadata; "
                       "create it with lite.layers.param")
    if len(axes) != len(variable.shape):
        raise ValueError(f"variable {name} has {len(axes)} logical axes {axes} for shape {tuple(variable.shape)}")
    return tuple(axes)


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


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state, mesh):
    """The PartitionSpecs of a pytree holding nnx Variables (a model State, or optimizer state built
    from one): each Variable's value replaced by its spec; other leaves must be scalars (replicated)."""
    def spec(path, leaf):
        if _is_variable(leaf):
            return leaf.replace(logical_to_spec(variable_axes(path, leaf), tuple(leaf.shape), mesh))
        if getattr(leaf, "ndim", 0) == 0:
            return P()
        raise KeyError(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} is not an nnx Variable: it has no "
                       "logical axes to shard it by")

    return jax.tree_util.tree_map_with_path(spec, state, is_leaf=_is_variable)


def state_shardings(state, mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def shard_model(model: nnx.Module, mesh) -> nnx.Module:
    """Place a model's variables on `mesh` by the rules (in place); returns the model."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    return model


def describe_param_shardings(state, mesh) -> list[tuple[str, tuple[int, ...], P]]:
    """(path "a/b/c", shape, spec) for every variable: what the rules did on this mesh."""
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), tuple(leaf.shape),
             logical_to_spec(variable_axes(path, leaf), tuple(leaf.shape), mesh))
            for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_variable)]
