"""Model configuration: one frozen dataclass and the named presets.

Field names follow ARCHITECTURE.md section 6; the Hugging Face names they map to are given where
they differ, so checkpoint import has one obvious place to look.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import jax.numpy as jnp

AMPLIFICATION_MODES = ("none", "sqrt_d", "layernorm")
DTYPES = ("float32", "bfloat16", "float16")
EXPERT_DISPATCHES = ("auto", "capacity", "ragged")  # meanings: sharding/expert_parallel.py
REMAT_POLICIES = ("full", "dots", "none")  # meanings: lite/model.py, LongcatModel.scan_layers
# The model's flat N-gram table has its row count rounded up to a multiple of this: 6144 = 3 x 2^11
# rows split evenly over any mesh of 2^a or 3 x 2^a devices up to 3072 (a 4x4x8 v5p slice, 3 or 4
# nodes of 8 GPUs), with an even number of rows per device (bf16 row pairs, the TPU gather) up to
# 1024 devices. The padded rows are never hashed into and stay zero (lite/ngram.py).
NGRAM_ROW_MULTIPLE = 6144


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the rule it breaks."""


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling, with the defaults and derivations of `transformers`' YaRN."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    attention_factor: float | None = None  # None: derived from mscale / mscale_all_dim
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    # Vocabulary and special tokens.
    vocab_size: int = 512  # V0 (HF vocab_size)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None  # carried to and from Hugging Face configs; batches pad with segment 0
    # Trunk.
    hidden_size: int = 64  # D
    num_layers: int = 2  # shortcut layers, each with 2 attention + 2 dense MLP blocks + 1 MoE
    rms_norm_eps: float = 1e-5
    # MLA attention.
    num_heads: int = 2
    q_lora_rank: int = 32
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 4096
    # Dense SwiGLU MLPs.
    ffn_hidden_size: int = 128
    # MoE with zero-computation experts.
    n_routed_experts: int = 4  # FFN experts
    zero_expert_num: int = 2  # identity experts
    moe_topk: int = 2
    expert_ffn_hidden_size: int = 32
    routed_scaling_factor: float = 1.0
    # The router bias steers the average number of FFN experts per token toward this target.
    target_ffn_experts_per_token: float = 1.0
    router_bias_update_rate: float = 1e-3
    # Expert parallelism on a mesh with an `expert` axis (sharding/expert_parallel.py; not exported to
    # Hugging Face configs): how routed slots travel to their experts' devices, and the capacity-
    # dispatch buffer size as a multiple of the balanced load, and the ragged dispatch's receive
    # buffer likewise (0: sized for the worst case, dropless). Inference is always dropless.
    expert_dispatch: str = "auto"
    expert_capacity_factor: float = 2.0
    ragged_buffer_factor: float = 0.0
    # What the backward pass of the scanned layers keeps from the forward (no Hugging Face field: it
    # travels in config.json's "lite" key): "full" keeps each layer's input and recomputes the layer
    # (one more forward), "dots" also keeps the outputs of XLA's matmuls without batch dimensions,
    # "none" keeps everything.
    remat: str = "full"
    # N-gram embedding (HF emb_neighbor_num, emb_split_num, ngram_vocab_size_ratio); 0 disables it.
    ngram_n: int = 3
    ngram_k: int = 2
    ngram_vocab_ratio: int = 2
    embedding_amplification: str = "none"
    # Numerics.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    initializer_range: float = 0.02

    def __post_init__(self):
        _validate(self)

    # Derived sizes: one place for every formula of ARCHITECTURE.md.

    @property
    def has_ngram(self) -> bool:
        return self.ngram_n >= 2

    @property
    def num_ngram_tables(self) -> int:
        """S = (N-1)K sub-tables, s = (n-2)K + (k-1)."""
        return (self.ngram_n - 1) * self.ngram_k if self.has_ngram else 0

    @property
    def ngram_table_width(self) -> int:
        return self.hidden_size // self.num_ngram_tables if self.has_ngram else 0

    @property
    def ngram_table_sizes(self) -> tuple[int, ...]:
        """Rows of sub-table s: V_s = ratio * V0 + 2s + 1 (the released sizes)."""
        m = self.ngram_vocab_ratio * self.vocab_size
        return tuple(m + 2 * s + 1 for s in range(self.num_ngram_tables))

    @property
    def ngram_table_orders(self) -> tuple[int, ...]:
        """The n of each sub-table: 2..N, each repeated K times."""
        return tuple(s // self.ngram_k + 2 for s in range(self.num_ngram_tables))

    @property
    def ngram_table_offsets(self) -> tuple[int, ...]:
        """First row of each sub-table inside the one flat table."""
        sizes = self.ngram_table_sizes
        return tuple(sum(sizes[:s]) for s in range(len(sizes)))

    @property
    def ngram_total_rows(self) -> int:
        """Rows of all sub-tables together: the rows the hash addresses (what Hugging Face stores)."""
        return sum(self.ngram_table_sizes)

    @property
    def ngram_padded_rows(self) -> int:
        """Rows of the model's flat table: ngram_total_rows rounded up to NGRAM_ROW_MULTIPLE (0 without
        an N-gram embedding). Rows from ngram_total_rows on are padding: no hash reaches them."""
        return -(-self.ngram_total_rows // NGRAM_ROW_MULTIPLE) * NGRAM_ROW_MULTIPLE

    @property
    def num_experts(self) -> int:
        """Router width: FFN experts followed by zero experts."""
        return self.n_routed_experts + self.zero_expert_num

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_compute_dtype(self):
        return jnp.dtype(self.compute_dtype)

    def replace(self, **overrides: Any) -> "ModelConfig":
        check_field_names(overrides)
        return dataclasses.replace(self, **overrides)


def check_field_names(names) -> None:
    """One clear error for names that are not ModelConfig fields (overrides, config.json keys)."""
    valid = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(names) - set(valid))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}{did_you_mean(unknown[0], valid)}; "
                          f"valid fields: {', '.join(valid)}")


def did_you_mean(name: str, valid) -> str:
    """" (did you mean 'x'?)" for the closest valid name, or "" when none is close."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _validate(c: ModelConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{c.name}: {message}")

    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "q_lora_rank", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden_size",
                  "expert_ffn_hidden_size", "moe_topk", "max_position_embeddings"):
        value = getattr(c, field)
        need(_is_int(value) and value > 0, f"{field} must be a positive integer, got {value!r}")
    # Types first (a config.json may hold anything), so that the rules below compare numbers.
    for field in ("bos_token_id", "eos_token_id", "n_routed_experts", "zero_expert_num", "ngram_n", "ngram_k",
                  "ngram_vocab_ratio"):
        need(_is_int(getattr(c, field)), f"{field} must be an integer, got {getattr(c, field)!r}")
    for field in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "target_ffn_experts_per_token",
                  "router_bias_update_rate", "expert_capacity_factor", "initializer_range"):
        value = getattr(c, field)
        need(_is_number(value) and math.isfinite(value), f"{field} must be a finite number, got {value!r}")
    for field in ("name", "expert_dispatch", "remat", "embedding_amplification", "param_dtype", "compute_dtype"):
        need(isinstance(getattr(c, field), str), f"{field} must be a string, got {getattr(c, field)!r}")
    # A zero or negative epsilon divides by zero on an all-zero row; theta <= 0 gives NaN frequencies.
    need(c.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {c.rms_norm_eps}")
    need(c.rope_theta > 0, f"rope_theta must be > 0, got {c.rope_theta}")
    need(c.routed_scaling_factor > 0, f"routed_scaling_factor must be > 0, got {c.routed_scaling_factor}")
    need(c.router_bias_update_rate >= 0, f"router_bias_update_rate must be >= 0, got {c.router_bias_update_rate}")
    need(c.initializer_range >= 0, f"initializer_range must be >= 0, got {c.initializer_range}")
    need(c.n_routed_experts >= 1, f"n_routed_experts must be >= 1, got {c.n_routed_experts}")
    need(c.zero_expert_num >= 0, f"zero_expert_num must be >= 0, got {c.zero_expert_num}")
    need(c.moe_topk <= c.num_experts,
         f"moe_topk={c.moe_topk} is larger than the number of experts "
         f"(n_routed_experts + zero_expert_num = {c.num_experts})")
    need(c.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even (RoPE pairs), got {c.qk_rope_head_dim}")
    need(0 <= c.target_ffn_experts_per_token <= c.moe_topk,
         f"target_ffn_experts_per_token={c.target_ffn_experts_per_token} must lie in [0, moe_topk={c.moe_topk}]")
    need(c.zero_expert_num > 0 or c.target_ffn_experts_per_token == c.moe_topk,
         "without zero experts every token uses moe_topk FFN experts: "
         f"set target_ffn_experts_per_token={c.moe_topk}")
    need(c.expert_dispatch in EXPERT_DISPATCHES,
         f"expert_dispatch must be one of {EXPERT_DISPATCHES}, got {c.expert_dispatch!r}")
    need(isinstance(c.expert_capacity_factor, (int, float)) and c.expert_capacity_factor > 0,
         f"expert_capacity_factor must be > 0, got {c.expert_capacity_factor!r}")
    need(c.remat in REMAT_POLICIES, f"remat must be one of {REMAT_POLICIES}, got {c.remat!r}")
    need(isinstance(c.ragged_buffer_factor, (int, float)) and c.ragged_buffer_factor >= 0,
         f"ragged_buffer_factor must be >= 0 (0: dropless), got {c.ragged_buffer_factor!r}")
    for i, token in (("bos_token_id", c.bos_token_id), ("eos_token_id", c.eos_token_id)):
        need(0 <= token < c.vocab_size, f"{i}={token} must lie in [0, vocab_size={c.vocab_size})")
    need(c.embedding_amplification in AMPLIFICATION_MODES,
         f"embedding_amplification must be one of {AMPLIFICATION_MODES}, got {c.embedding_amplification!r}")
    for field in ("param_dtype", "compute_dtype"):
        need(getattr(c, field) in DTYPES, f"{field} must be one of {DTYPES}, got {getattr(c, field)!r}")
    need(c.ngram_n == 0 or c.ngram_n >= 2, f"ngram_n must be 0 (no N-gram embedding) or >= 2, got {c.ngram_n}")
    if c.has_ngram:
        need(c.ngram_k >= 1, f"ngram_k must be >= 1, got {c.ngram_k}")
        need(c.ngram_vocab_ratio >= 1, f"ngram_vocab_ratio must be >= 1, got {c.ngram_vocab_ratio}")
        s = c.num_ngram_tables
        need(c.hidden_size % s == 0,
             f"hidden_size={c.hidden_size} is not divisible by (ngram_n-1)*ngram_k={s} N-gram sub-tables")
        # The hash is computed in 32-bit integers and the flat table is indexed with int32.
        need(c.ngram_padded_rows < 2**31,
             f"the N-gram tables have {c.ngram_padded_rows} rows in all (padded); int32 indexing allows < 2^31")
    if c.rope_scaling is not None:
        need(isinstance(c.rope_scaling, YarnScaling), f"rope_scaling must be YaRN scaling or None, got {c.rope_scaling!r}")
        for field in dataclasses.fields(YarnScaling):
            value = getattr(c.rope_scaling, field.name)
            need(field.name == "truncate" or (value is None and field.name == "attention_factor")
                 or (_is_number(value) and math.isfinite(value)),
                 f"rope_scaling.{field.name} must be a finite number, got {value!r}")
        need(c.rope_scaling.factor >= 1.0, f"rope_scaling.factor must be >= 1, got {c.rope_scaling.factor}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Presets.

_LONGCAT_FLASH_LITE = ModelConfig(
    name="longcat-flash-lite",
    vocab_size=131072, bos_token_id=1, eos_token_id=2,
    hidden_size=3072, num_layers=14, rms_norm_eps=1e-5,
    num_heads=32, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128,
    # 256K context with YaRN, factor 10 over 32K (values from third-party copies of the config).
    rope_theta=5_000_000.0,
    rope_scaling=YarnScaling(factor=10.0, original_max_position_embeddings=32768),
    max_position_embeddings=327680,
    ffn_hidden_size=6144,
    n_routed_experts=256, zero_expert_num=128, moe_topk=12, expert_ffn_hidden_size=1024,
    routed_scaling_factor=6.0, target_ffn_experts_per_token=8.0,
    ngram_n=4, ngram_k=4, ngram_vocab_ratio=78, embedding_amplification="none",
    param_dtype="bfloat16", compute_dtype="bfloat16",
)

_LONGCAT_FLASH = ModelConfig(
    name="longcat-flash",
    vocab_size=131072, bos_token_id=1, eos_token_id=2,
    hidden_size=6144, num_layers=28, rms_norm_eps=1e-5,
    num_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128,
    rope_theta=10_000_000.0, max_position_embeddings=131072,
    ffn_hidden_size=12288,
    n_routed_experts=512, zero_expert_num=256, moe_topk=12, expert_ffn_hidden_size=2048,
    routed_scaling_factor=6.0, target_ffn_experts_per_token=8.0,
    ngram_n=0,
    param_dtype="bfloat16", compute_dtype="bfloat16",
)

PRESETS: dict[str, ModelConfig] = {
    # Unit tests: every feature on, a forward pass in milliseconds.
    "tiny": ModelConfig(name="tiny"),
    # The CPU training default: ~17M parameters, about half of them in the N-gram tables.
    "demo": ModelConfig(
        name="demo",
        vocab_size=4096, hidden_size=256, num_layers=2,
        num_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, max_position_embeddings=2048,
        ffn_hidden_size=512,
        n_routed_experts=8, zero_expert_num=4, moe_topk=3, expert_ffn_hidden_size=256,
        routed_scaling_factor=2.0, target_ffn_experts_per_token=2.0,
        router_bias_update_rate=1e-2,  # a short CPU run has only hundreds of steps to balance in
        ngram_n=3, ngram_k=2, ngram_vocab_ratio=8, embedding_amplification="none",
        # Its activations fit any CPU; recomputing each layer in the backward costs 10-20% of the step
        # (batch 8 x 256 on 2 cores: 1,573-1,826 vs 1,908-2,008 tokens/s).
        remat="none",
    ),
    "longcat-flash-lite": _LONGCAT_FLASH_LITE,
    "longcat-flash": _LONGCAT_FLASH,
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with field overrides; unknown names and fields list the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)

