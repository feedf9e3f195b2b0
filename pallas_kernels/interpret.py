"""Pallas interpret mode inside `jax.shard_map` with check_vma=True (a workaround for jax 0.10 / 0.11).

JAX's HLO interpreter evaluates a kernel's index maps and body on the call's operands, which carry
the mesh axes they vary over, next to fresh grid indices that carry none, and the vma checks of
`dynamic_slice` and `while_loop` then refuse the mix ("requires varying manual axes to match").
Inside one kernel every value is per device by definition, so `enable()` makes the interpreter
see operands without varying axes (an identity primitive, `strip_varying`) and gives its results
back the axes the call declared (`pvary`, also an identity in HLO). Compiled kernels (Mosaic,
Triton) never take this path; only the tests' and benchmarks' interpret backends do.
"""

from __future__ import annotations

import jax
from jax._src import core
from jax._src.interpreters import mlir
from jax._src.pallas import hlo_interpreter

strip_varying_p = core.Primitive("strip_varying")
strip_varying_p.def_abstract_eval(lambda aval: aval.update_manual_axis_type(core.empty_mat))
mlir.register_lowering(strip_varying_p, lambda ctx, x: [x])

_interpret = hlo_interpreter.pallas_call_hlo_interpret


def _interpret_per_device(*args, out_avals, **params):
    stripped = [strip_varying_p.bind(a) if core.typeof(a).manual_axis_type.varying else a for a in args]
    outs = _interpret(*stripped, out_avals=out_avals, **params)
    return [jax.lax.pcast(out, tuple(sorted(aval.manual_axis_type.varying)), to="varying")
            for out, aval in zip(outs, out_avals)]


def enable() -> None:
    """Install the per-device interpreter (idempotent)."""
    hlo_interpreter.pallas_call_hlo_interpret = _interpret_per_device
