"""Training: the run configuration, the optimizer, one jitted step, validation and step metrics.

The step is a pure function of a `TrainState` pytree (f32 master parameters, the router bias, the
optimizer state, the step counter) and a batch; the model's graph is split off once and merged
inside the traced function, so no NNX graph work happens per step. The learning rate is computed
in the step from the step counter and the planned number of steps (an argument), so the compiled
step does not depend on how long the run is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lite.config import ConfigError, ModelConfig, did_you_mean
from lite.layers import is_lookup
from lite.model import LongcatModel, abstract_model, next_token_loss
from lite.moe import ffn_experts_per_token
from lite.ngram import ngram_ids
from lite.params import count_params
from sharding.rules import state_shardings, variable_axes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # global: rows per step over all processes
    seq_len: int = 256
    steps: int = 0  # 0: planned once from `minutes` (measured step time) and saved with the run
    minutes: float = 10.0  # wall-clock budget of the whole command when steps = 0
    learning_rate: float = 3e-3  # peak
    min_learning_rate_ratio: float = 0.1  # cosine decays to peak * this
    warmup_ratio: float = 0.05  # share of the steps spent warming up linearly from 0
    weight_decay: float = 0.1  # AdamW, on matrices only (not norms, biases or embedding tables)
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient norm
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2); 0 disables it
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    sample_tokens: int = 48  # tokens sampled per prompt at the end; 0 skips sampling
    peak_tflops: float = 0.0  # per device, for the MFU estimate; 0: from the device kind

    def __post_init__(self):
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        # inf or NaN in any setting (e.g. learning_rate=inf) makes every step non-finite.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            need(not isinstance(value, float) or math.isfinite(value), f"{field.name} must be a finite number, got {value}")
        for name in ("batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "sample_tokens"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.steps > 0 or self.minutes > 0, f"minutes must be > 0 when steps = 0, got {self.minutes}")
        need(self.seq_len >= 2, f"seq_len must be >= 2 (next-token targets), got {self.seq_len}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(0 <= self.min_learning_rate_ratio <= 1, f"min_learning_rate_ratio must lie in [0, 1], got {self.min_learning_rate_ratio}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        for name in ("weight_decay", "grad_clip", "z_loss", "peak_tflops"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# `--set key=value` overrides, for model and training fields alike.

def _parse_value(key: str, text: str, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
    except ValueError:
        pass
    else:
        raise ConfigError(f"--set {key}: this field cannot be set from the command line")
    raise ConfigError(f"--set {key}={text}: {key} must be {kind.__name__}, got {text!r}")


def parse_overrides(items: list[str], model_cfg: ModelConfig, train_cfg: TrainConfig
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """["key=value", ...] -> (model overrides, training overrides), typed by each field's current value."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_over, train_over = {}, {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        if key in model_fields:
            model_over[key] = _parse_value(key, text, getattr(model_cfg, key))
        elif key in train_fields:
            train_over[key] = _parse_value(key, text, getattr(train_cfg, key))
        else:
            raise ConfigError(f"--set {key}: unknown key{did_you_mean(key, model_fields | train_fields)}; "
                              f"model fields: {', '.join(sorted(model_fields))}; "
                              f"training fields: {', '.join(sorted(train_fields))}")
    return model_over, train_over


# ---------------------------------------------------------------------------------------------
# Optimizer.

def learning_rate(step: jax.Array, total_steps: jax.Array, tcfg: TrainConfig) -> jax.Array:
    """Linear warmup from 0 to the peak over warmup_ratio * total steps, then cosine to peak * min ratio,
    held there after total_steps (the added steps of a run continued past its plan)."""
    step = jnp.asarray(step, jnp.float32)
    total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
    warmup = jnp.maximum(jnp.round(tcfg.warmup_ratio * total), 1.0)
    progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    floor = tcfg.min_learning_rate_ratio
    cosine = floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return tcfg.learning_rate * jnp.where(step < warmup, (step + 1) / warmup, cosine)


def decays(axes: tuple[str, ...]) -> bool:
    """Weight decay applies to matrices, not to norms or lookup tables (lite.layers.LOOKUP_AXES: rows
    not looked up in a step would shrink anyway; with N-gram tables that is most rows)."""
    return "norm" not in axes and not is_lookup(axes)


def weight_decay_mask(params: nnx.State) -> Any:
    """params with each Variable's value replaced by whether it decays (by its logical axes)."""
    return jax.tree_util.tree_map_with_path(lambda path, v: v.replace(decays(variable_axes(path, v))), params,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer(tcfg: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
    """AdamW without the learning rate (the step multiplies by `learning_rate(...)`): clip, Adam, decay."""
    return optax.chain(
        optax.clip_by_global_norm(tcfg.grad_clip) if tcfg.grad_clip > 0 else optax.identity(),
        optax.scale_by_adam(tcfg.adam_b1, tcfg.adam_b2, tcfg.adam_eps),
        optax.add_decayed_weights(tcfg.weight_decay, weight_decay_mask(params)),
    )


# ---------------------------------------------------------------------------------------------
# State, step, validation.

class TrainState(NamedTuple):
    params: nnx.State  # nnx.Param leaves, float32 master copies
    other: nnx.State  # the router bias (moved by its update rule, not by gradients)
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer steps taken


class StatePlan(NamedTuple):
    """What a training state is before it exists: its graph, its optimizer, the function that creates it."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    create: Callable[[], TrainState]  # a fresh model (seeded with tcfg.seed) and optimizer state

    def abstract(self) -> TrainState:
        """Shapes, dtypes and variable metadata only (nothing allocated)."""
        return jax.eval_shape(self.create)


def plan_state(cfg: ModelConfig, tcfg: TrainConfig) -> StatePlan:
    graphdef, abstract_params, _ = nnx.split(abstract_model(cfg), nnx.Param, ...)
    tx = optimizer(tcfg, abstract_params)

    def create() -> TrainState:
        _, params, other = nnx.split(LongcatModel(cfg, rngs=nnx.Rngs(tcfg.seed)), nnx.Param, ...)
        return TrainState(params, other, tx.init(params), jnp.zeros((), jnp.int32))

    return StatePlan(graphdef, tx, create)


def init_state(cfg: ModelConfig, tcfg: TrainConfig, mesh=None
               ) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
    """A fresh model and optimizer state, created in one compiled call (creating the model eagerly
    compiles every initializer separately: seconds per run), and placed on `mesh` by sharding.rules
    (experts, N-gram rows and dense weights split as the mesh allows)."""
    plan = plan_state(cfg, tcfg)
    shardings = None if mesh is None else state_shardings(plan.abstract(), mesh)
    return plan.graphdef, jax.jit(plan.create, out_shardings=shardings)(), plan.tx


def z_loss(logits: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """mean over non-padding positions of logsumexp(logits)^2: keeps the softmax normaliser near 1."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    valid = segment_ids > 0
    return jnp.sum(jnp.where(valid, lse * lse, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def ngram_rows_touched(tokens: jax.Array, segment_ids: jax.Array, cfg: ModelConfig) -> jax.Array:
    """int32: distinct rows of the flat N-gram table that the batch looks up (padding excluded)."""
    if not cfg.has_ngram:
        return jnp.zeros((), jnp.int32)
    rows = ngram_ids(tokens, cfg, segment_ids) + jnp.asarray(cfg.ngram_table_offsets, jnp.int32)
    rows = jnp.where((segment_ids > 0)[..., None], rows, cfg.ngram_total_rows)  # out of range: dropped
    hit = jnp.zeros((cfg.ngram_total_rows,), bool).at[rows.reshape(-1)].set(True, mode="drop")
    return jnp.sum(hit, dtype=jnp.int32)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: ModelConfig,
                    tcfg: TrainConfig):
    """(state, tokens [B, L], segment_ids [B, L], total_steps) -> (state, metrics), pure and jittable."""

    def step(state: TrainState, tokens: jax.Array, segment_ids: jax.Array, total_steps: jax.Array):
        def loss_fn(params):
            out = nnx.merge(graphdef, params, state.other)(tokens, segment_ids)
            loss, _ = next_token_loss(out.logits, tokens, segment_ids)
            z = z_loss(out.logits, segment_ids) if tcfg.z_loss else jnp.zeros((), jnp.float32)
            return loss + tcfg.z_loss * z, (loss, z, out.expert_counts)

        (_, (loss, z, expert_counts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        lr = learning_rate(state.step, total_steps, tcfg)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
        model = nnx.merge(graphdef, params, state.other)
        model.update_router_bias(expert_counts)
        other = nnx.state(model, nnx.Not(nnx.Param))
        metrics = dict(loss=loss, z_loss=z, grad_norm=optax.tree.norm(grads), learning_rate=lr,
                       expert_counts=expert_counts,
                       ngram_rows_touched=ngram_rows_touched(tokens, segment_ids, cfg))
        return TrainState(params, other, opt_state, state.step + 1), metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef):
    """(state, tokens, segment_ids) -> (summed next-token NLL, number of targets), both float32."""

    def eval_step(state: TrainState, tokens: jax.Array, segment_ids: jax.Array):
        out = nnx.merge(graphdef, state.params, state.other)(tokens, segment_ids)
        loss, count = next_token_loss(out.logits, tokens, segment_ids)
        return loss * count, count.astype(jnp.float32)

    return eval_step


def evaluate(eval_step: Callable, state: TrainState, tokens: np.ndarray, segment_ids: np.ndarray, batch_size: int,
             to_device: Callable[..., Sequence[jax.Array]] | None = None) -> float:
    """Mean next-token NLL per target (nats) over packed rows tokens, segment_ids int32[R, L].

    The rows go to `eval_step` (make_eval_step's, jitted) `batch_size` at a time and its summed NLLs
    and target counts are added up on the host: padding rows (segment 0) hold no targets.
    `to_device(tokens, segment_ids)` places each batch (train.py: one global array from every
    process's rows); without it the NumPy rows are passed as they are.
    """
    total = count = 0.0
    for i in range(0, len(tokens), batch_size):
        batch = (tokens[i: i + batch_size], segment_ids[i: i + batch_size])
        nll, targets = eval_step(state, *(to_device(*batch) if to_device else batch))
        total, count = total + float(nll), count + float(targets)
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------------------------
# Metrics on the host.

def expert_load_metrics(expert_counts: np.ndarray, cfg: ModelConfig) -> dict[str, Any]:
    """float32[num_layers, E + Z] routing slots -> per-layer load summaries (lists over layers).

    load_min/max_share: the least / most loaded FFN expert's share of the FFN slots (balanced: 1/E);
    ffn_experts_per_token: average FFN experts a token used; zero_expert_share: share of all routing
    slots that went to zero experts.
    """
    counts = np.asarray(expert_counts, np.float64)
    ffn = counts[:, : cfg.n_routed_experts]
    ffn_share = ffn / np.maximum(ffn.sum(-1, keepdims=True), 1.0)
    return dict(
        load_min_share=ffn_share.min(-1).round(5).tolist(),
        load_max_share=ffn_share.max(-1).round(5).tolist(),
        ffn_experts_per_token=np.asarray(ffn_experts_per_token(jnp.asarray(counts, jnp.float32), cfg), np.float64).round(4).tolist(),
        zero_expert_share=(counts[:, cfg.n_routed_experts:].sum(-1) / np.maximum(counts.sum(-1), 1.0)).round(5).tolist(),
    )


def flops_per_token(cfg: ModelConfig, seq_len: int, ffn_per_token: float) -> float:
    """Training FLOPs per token: 6 x activated parameters, plus attention scores and values
    (6 x L x heads x (qk + v head dims) per attention block, two blocks per layer)."""
    activated = count_params(cfg).activated(ffn_per_token)
    attention = 6 * seq_len * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2 * cfg.num_layers
    return 6 * activated + attention


_PEAK_TFLOPS = (  # dense bf16 per device
    ("v6 lite", 918), ("v6e", 918), ("v5 lite", 197), ("v5e", 197), ("v5p", 459), ("v5", 459), ("v4", 275),
    ("b200", 2250), ("h200", 989), ("h100", 989), ("a100", 312), ("l4", 121),
)


@functools.lru_cache(maxsize=1)
def measured_cpu_matmul_flops(size: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of a float32 [size, size] @ [size, size] product on the default device, the best of
    `repeats` after a compile: the realistic dense f32 peak of this machine's cores (XLA:CPU uses them
    all for one product), measured once per process (about 0.1 s)."""
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(x, x).compile()
    jax.block_until_ready(matmul(x, x))
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(matmul(x, x))
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best


def peak_flops(device: jax.Device, tcfg: TrainConfig) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number comes from. On CPU (training runs in float32
    there) the f32 matmul rate measured at first use, all cores together."""
    if tcfg.peak_tflops:
        return tcfg.peak_tflops * 1e12, "peak_tflops"
    kind = device.device_kind.lower()
    for needle, tflops in _PEAK_TFLOPS:
        if needle in kind:
            return tflops * 1e12, f"{device.device_kind} bf16 dense"
    if device.platform == "cpu":
        flops = measured_cpu_matmul_flops()
        return flops, f"f32 matmul measured on {os.cpu_count() or 1} CPU cores: {flops / 1e9:,.0f} GFLOP/s"
    return math.nan, f"unknown device {device.device_kind}: set peak_tflops"
