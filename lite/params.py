"""Parameter accounting from abstract shapes (nothing is allocated), and its CLI.

    python -m lite.params longcat-flash-lite

The N-gram table's zero padding rows (`ModelConfig.ngram_padded_rows`: no hash reaches them) are
not parameters; `ParamCounts.padding` holds their element count, shown apart.

"Activated" parameters are those a token's forward pass multiplies with: everything except the
embedding tables (a lookup) and the FFN experts it was not routed to. Zero experts make the
number of FFN experts per token vary from 0 to top-k, so activated parameters are a range.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import numpy as np
from flax import nnx

from lite.config import ConfigError, ModelConfig, PRESETS, get_config
from lite.layers import LOOKUP_AXES
from lite.model import abstract_model
from sharding.rules import variable_axes

# The component of a parameter, by the first of its logical axes (lite.layers) found in this order.
_COMPONENT_BY_AXIS = (
    ("token_rows", "token embedding"),
    ("ngram_rows", "N-gram tables"),
    ("ngram_tables", "N-gram projections"),
    ("experts", "FFN experts"),
    ("router_experts", "routers"),
    ("norm", "norms"),
    ("q_lora", "attention (MLA)"),
    ("kv_lora", "attention (MLA)"),
    ("heads", "attention (MLA)"),
    ("mlp", "dense MLPs"),
    ("vocab", "LM head"),
)
_LOOKUP_COMPONENTS = {name for axis, name in _COMPONENT_BY_AXIS if axis in LOOKUP_AXES}


def component(path, variable: nnx.Variable) -> str:
    axes = variable_axes(path, variable)
    for axis, name in _COMPONENT_BY_AXIS:
        if axis in axes:
            return name
    raise KeyError(f"parameter {jax.tree_util.keystr(path)} with logical axes {axes} belongs to no known component")


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    by_component: dict[str, int]
    per_expert: int  # one FFN expert of one layer
    num_layers: int
    moe_topk: int
    padding: int = 0  # elements of the N-gram table's zero padding rows, in no component

    @property
    def total(self) -> int:
        return sum(self.by_component.values())

    def activated(self, ffn_experts_per_token: float) -> float:
        dense = sum(n for name, n in self.by_component.items()
                    if name not in _LOOKUP_COMPONENTS and name != "FFN experts")
        return dense + ffn_experts_per_token * self.per_expert * self.num_layers

    @property
    def activated_range(self) -> tuple[float, float]:
        return self.activated(0), self.activated(self.moe_topk)


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Parameter counts of a config, from `nnx.eval_shape` (no memory is allocated)."""
    params = nnx.state(abstract_model(cfg), nnx.Param)
    by_component: dict[str, int] = {}
    for path, variable in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        name = component(path, variable)
        by_component[name] = by_component.get(name, 0) + int(np.prod(variable.shape))
    padding = (cfg.ngram_padded_rows - cfg.ngram_total_rows) * cfg.ngram_table_width
    if padding:
        by_component["N-gram tables"] -= padding
    per_expert = 3 * cfg.hidden_size * cfg.expert_ffn_hidden_size
    return ParamCounts(by_component, per_expert, cfg.num_layers, cfg.moe_topk, padding)


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3f}{unit}"
    return f"{n:.0f}"


def format_table(cfg: ModelConfig, counts: ParamCounts) -> str:
    total = counts.total
    lines = [f"{cfg.name}: parameters by component", f"{'component':<22}{'count':>16}{'human':>10}{'share':>8}"]
    for name, n in sorted(counts.by_component.items(), key=lambda item: -item[1]):
        lines.append(f"{name:<22}{n:>16,}{_human(n):>10}{n / total:>8.1%}")
    low, high = counts.activated_range
    target = counts.activated(cfg.target_ffn_experts_per_token)
    lines += [
        f"{'total':<22}{total:>16,}{_human(total):>10}{1:>8.1%}",
        f"activated per token: {_human(low)} (0 FFN experts) .. {_human(high)} ({cfg.moe_topk} FFN experts); "
        f"{_human(target)} at the target of {cfg.target_ffn_experts_per_token:g}",
        f"total / activated (at target): {total / target:.1f}",
    ]
    if counts.padding:
        lines.append(f"not counted: {counts.padding:,} zeros padding the N-gram table to "
                     f"{cfg.ngram_padded_rows:,} rows (a multiple every mesh divides)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    args = parser.parse_args(argv)
    try:
        cfg = get_config(args.preset)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with jax.default_device(jax.devices("cpu")[0]):
        print(format_table(cfg, count_params(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
