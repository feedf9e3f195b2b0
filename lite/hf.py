"""The Hugging Face side of LongCat-Flash(-Lite) checkpoints: config translation and the key layout.

`config_from_hf` / `config_to_hf` translate `config.json` of model types `longcat_flash` (the
`transformers` class `LongcatFlashForCausalLM`) and `longcat_flash_ngram` (LongCat-Flash-Lite's
remote code) to and from `ModelConfig`. `tensor_layout` says, for every tensor of our checkpoint
format (lite/checkpoint.py), which Hugging Face tensors it is made of: our tensors stack per-layer
(and per-expert) weights on leading axes and store kernels [in, out]; Hugging Face stores one tensor
per layer and expert, torch-style [out, in]. Both conversion directions read the same layout, so
they cannot disagree. See ../shared/reference/HF_CHECKPOINT.md for the key list.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from lite.config import ConfigError, ModelConfig, YarnScaling, check_field_names

MODEL_TYPE_PLAIN = "longcat_flash"
MODEL_TYPE_NGRAM = "longcat_flash_ngram"
ARCHITECTURES = {MODEL_TYPE_PLAIN: "LongcatFlashForCausalLM", MODEL_TYPE_NGRAM: "LongcatFlashNgramForCausalLM"}

# Our fields with no Hugging Face counterpart travel in config.json under this key, so that
# ours -> HF -> ours keeps them; `transformers` keeps unknown config keys and ignores them.
EXTRA_KEY = "lite"
_EXTRA_FIELDS = ("name", "target_ffn_experts_per_token", "router_bias_update_rate", "compute_dtype", "remat")

# Checkpoint keys an importer skips: the multi-token-prediction head (not used for inference).
IGNORED_KEY = re.compile(r"^model\.mtp\.")
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# Config.

def _get(hf: dict, *names: str, default: Any = KeyError) -> Any:
    """The first of `names` present in the HF config (aliases), else the default or a clear error."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    if default is KeyError:
        raise ConfigError(f"Hugging Face config.json lacks {' / '.join(names)}")
    return default


def _rope_from_hf(hf: dict, max_positions: int) -> tuple[float, YarnScaling | None]:
    """rope_theta and YaRN from either the legacy (`rope_theta` + `rope_scaling`) or the
    transformers >= 5 (`rope_parameters`) form, with transformers' defaults for absent keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000_000.0)))  # LongcatFlashConfig.default_theta
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise ConfigError(f"rope type {rope_type!r} is not supported (only 'default' and 'yarn')")
    original = int(params.get("original_max_position_embeddings",
                              hf.get("original_max_position_embeddings", max_positions)))
    factor = params.get("factor") or max_positions / original
    return theta, YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        # Absent means "not used" in transformers' YaRN (falsy), so absent becomes 0 here.
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
        truncate=bool(params.get("truncate", True)),
    )


def _dtype_from_hf(hf: dict) -> str:
    # transformers loads a config without a dtype field in float32 (PretrainedConfig's default).
    dtype = str(_get(hf, "dtype", "torch_dtype", default="float32")).removeprefix("torch.")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"Hugging Face dtype {dtype!r} is not supported (float32, bfloat16, float16)")
    return dtype


def hf_model_type(hf: dict) -> str:
    """model_type, or where a config lacks it (copies of the released configs do, and transformers
    accepts them through `architectures` / auto_map), inferred from `architectures`, then from the
    N-gram fields."""
    model_type = hf.get("model_type")
    if model_type is None:
        by_architecture = {arch: kind for kind, arch in ARCHITECTURES.items()}
        found = {by_architecture[a] for a in hf.get("architectures") or () if a in by_architecture}
        if len(found) == 1:
            model_type = found.pop()
        elif "emb_neighbor_num" in hf:
            model_type = MODEL_TYPE_NGRAM
        elif "zero_expert_num" in hf or "n_routed_experts" in hf:
            model_type = MODEL_TYPE_PLAIN
    if model_type not in (MODEL_TYPE_PLAIN, MODEL_TYPE_NGRAM):
        raise ConfigError(f"model_type {model_type!r} is not supported; expected {MODEL_TYPE_PLAIN!r} "
                          f"or {MODEL_TYPE_NGRAM!r} (or a config whose architectures name "
                          f"{' / '.join(ARCHITECTURES.values())})")
    return model_type


def looks_like_hf_config(config: dict) -> bool:
    """A Hugging Face config.json (rather than ours, lite.checkpoint's field names)."""
    return any(key in config for key in ("model_type", "architectures", "num_attention_heads", "num_hidden_layers"))


def config_from_hf(hf: dict, **overrides: Any) -> ModelConfig:
    """`ModelConfig` from a Hugging Face config.json dict (model type longcat_flash or longcat_flash_ngram).

    `overrides` set fields the HF config does not carry (e.g. `compute_dtype`, `name`).
    """
    model_type = hf_model_type(hf)
    for flag, expected in (("attention_bias", False), ("router_bias", False), ("tie_word_embeddings", False),
                           ("mla_scale_q_lora", True), ("mla_scale_kv_lora", True), ("hidden_act", "silu")):
        if flag in hf and hf[flag] != expected:
            raise ConfigError(f"Hugging Face config {flag}={hf[flag]!r} is not supported (this model needs {expected!r})")
    if "num_layers" in hf:
        num_layers = int(hf["num_layers"])
    else:
        num_layers = int(_get(hf, "num_hidden_layers")) // 2  # two attention blocks per shortcut layer
    rope_dim = int(_get(hf, "qk_rope_head_dim"))
    if hf.get("head_dim") not in (None, rope_dim):
        raise ConfigError(f"head_dim={hf['head_dim']} must equal qk_rope_head_dim={rope_dim} "
                          "(transformers uses head_dim as the rotary dimension)")
    max_positions = int(_get(hf, "max_position_embeddings"))
    theta, yarn = _rope_from_hf(hf, max_positions)
    eos = _get(hf, "eos_token_id", default=2)
    n_routed = int(_get(hf, "n_routed_experts", "num_local_experts"))
    zero = int(_get(hf, "zero_expert_num", default=0))
    topk = int(_get(hf, "moe_topk", "num_experts_per_tok"))
    dtype = _dtype_from_hf(hf)
    fields: dict[str, Any] = dict(
        name=hf.get("_name_or_path") or model_type,
        vocab_size=int(_get(hf, "vocab_size")),
        bos_token_id=int(_get(hf, "bos_token_id", default=1)),
        eos_token_id=int(eos[0] if isinstance(eos, (list, tuple)) else eos),
        pad_token_id=None if hf.get("pad_token_id") is None else int(hf["pad_token_id"]),
        hidden_size=int(_get(hf, "hidden_size")),
        num_layers=num_layers,
        rms_norm_eps=float(_get(hf, "rms_norm_eps", default=1e-5)),
        num_heads=int(_get(hf, "num_attention_heads")),
        q_lora_rank=int(_get(hf, "q_lora_rank")),
        kv_lora_rank=int(_get(hf, "kv_lora_rank")),
        qk_nope_head_dim=int(_get(hf, "qk_nope_head_dim")),
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(_get(hf, "v_head_dim")),
        rope_theta=theta,
        rope_scaling=yarn,
        max_position_embeddings=max_positions,
        ffn_hidden_size=int(_get(hf, "ffn_hidden_size", "intermediate_size")),
        n_routed_experts=n_routed,
        zero_expert_num=zero,
        moe_topk=topk,
        expert_ffn_hidden_size=int(_get(hf, "expert_ffn_hidden_size", "moe_intermediate_size")),
        routed_scaling_factor=float(_get(hf, "routed_scaling_factor", default=6.0)),
        # Uniform load over all experts: 8 FFN experts per token of 12 at the released sizes.
        target_ffn_experts_per_token=topk * n_routed / (n_routed + zero),
        ngram_n=0,
        param_dtype=dtype,
        compute_dtype=dtype,
        initializer_range=float(_get(hf, "initializer_range", default=0.02)),
    )
    if model_type == MODEL_TYPE_NGRAM:
        fields.update(ngram_n=int(_get(hf, "emb_neighbor_num")), ngram_k=int(_get(hf, "emb_split_num")),
                      ngram_vocab_ratio=int(_get(hf, "ngram_vocab_size_ratio")), embedding_amplification="none")
    extra = hf.get(EXTRA_KEY) or {}
    fields.update({k: v for k, v in extra.items() if k in _EXTRA_FIELDS})
    check_field_names(overrides)
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig) -> dict:
    """A Hugging Face config.json dict: `LongcatFlashForCausalLM` loads the plain model's; the N-gram
    model's carries model_type longcat_flash_ngram and the N-gram fields of the released checkpoint."""
    if cfg.embedding_amplification != "none":
        raise ConfigError(f"embedding_amplification={cfg.embedding_amplification!r} has no Hugging Face "
                          "equivalent; only 'none' can be exported")
    model_type = MODEL_TYPE_NGRAM if cfg.has_ngram else MODEL_TYPE_PLAIN
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_hidden_layers": 2 * cfg.num_layers,
        "rms_norm_eps": cfg.rms_norm_eps,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "n_routed_experts": cfg.n_routed_experts,
        "zero_expert_num": cfg.zero_expert_num,
        "moe_topk": cfg.moe_topk,
        "expert_ffn_hidden_size": cfg.expert_ffn_hidden_size,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
        "initializer_range": cfg.initializer_range,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
    }
    y = cfg.rope_scaling
    if y is not None:
        hf["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": y.factor,
                              "original_max_position_embeddings": y.original_max_position_embeddings,
                              "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale": y.mscale,
                              "mscale_all_dim": y.mscale_all_dim, "truncate": y.truncate}
        if y.attention_factor is not None:
            hf["rope_scaling"]["attention_factor"] = y.attention_factor
    if cfg.has_ngram:
        hf.update(emb_neighbor_num=cfg.ngram_n, emb_split_num=cfg.ngram_k, ngram_vocab_size_ratio=cfg.ngram_vocab_ratio)
    hf[EXTRA_KEY] = {k: getattr(cfg, k) for k in _EXTRA_FIELDS}
    return hf


def generation_config(cfg: ModelConfig) -> dict:
    """generation_config.json: the special ids `generate()` reads (greedy by default, as serve.py)."""
    config = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    if cfg.pad_token_id is not None:
        config["pad_token_id"] = cfg.pad_token_id
    return config


# ---------------------------------------------------------------------------------------------
# Tensor layout.

@dataclasses.dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor inside one of our tensors: `ours[index]` (transposed when
    `transpose`) is the HF tensor. `index` holds leading integers (layer, expert) and, for the
    concatenated N-gram table, a row slice; the pieces of a tensor, in order, tile it front to back."""

    hf_key: str
    index: tuple
    transpose: bool


# (our name inside a layer, HF name inside model.layers.L, transposed)
_ATTN = (("q_a_proj.kernel", "q_a_proj.weight", True), ("q_a_norm.weight", "q_a_layernorm.weight", False),
         ("q_b_proj.kernel", "q_b_proj.weight", True),
         ("kv_a_proj.kernel", "kv_a_proj_with_mqa.weight", True),
         ("kv_a_norm.weight", "kv_a_layernorm.weight", False), ("kv_b_proj.kernel", "kv_b_proj.weight", True),
         ("o_proj.kernel", "o_proj.weight", True))
_MLP = (("gate_proj.kernel", "gate_proj.weight", True), ("up_proj.kernel", "up_proj.weight", True),
        ("down_proj.kernel", "down_proj.weight", True))
_EXPERT = (("w_gate", "gate_proj.weight"), ("w_up", "up_proj.weight"), ("w_down", "down_proj.weight"))


def tensor_layout(cfg: ModelConfig) -> dict[str, list[Piece]]:
    """For each tensor of our checkpoint format (by name, as `lite.checkpoint` writes it), its pieces."""
    layers = range(cfg.num_layers)
    layout: dict[str, list[Piece]] = {
        "embed.token_table": [Piece("model.embed_tokens.weight", (), False)],
        "final_norm.weight": [Piece("model.norm.weight", (), False)],
        "lm_head.kernel": [Piece("lm_head.weight", (), True)],
    }

    def per_layer(ours: str, hf: str, transpose: bool) -> None:
        layout[f"layers.{ours}"] = [Piece(f"model.layers.{l}.{hf}", (l,), transpose) for l in layers]

    for i in range(2):
        per_layer(f"attn_norms.{i}.weight", f"input_layernorm.{i}.weight", False)
        per_layer(f"mlp_norms.{i}.weight", f"post_attention_layernorm.{i}.weight", False)
        for ours, hf, transpose in _ATTN:
            per_layer(f"attns.{i}.{ours}", f"self_attn.{i}.{hf}", transpose)
        for ours, hf, transpose in _MLP:
            per_layer(f"mlps.{i}.{ours}", f"mlps.{i}.{hf}", transpose)
    per_layer("moe.router.classifier", "mlp.router.classifier.weight", True)
    per_layer("moe.router.bias", "mlp.router.e_score_correction_bias", False)
    for ours, hf in _EXPERT:
        layout[f"layers.moe.{ours}"] = [Piece(f"model.layers.{l}.mlp.experts.{e}.{hf}", (l, e), True)
                                        for l in layers for e in range(cfg.n_routed_experts)]
    if cfg.has_ngram:
        layout["embed.ngram_table"] = [
            Piece(f"model.ngram_embeddings.embedders.{s}.weight", (slice(offset, offset + size),), False)
            for s, (offset, size) in enumerate(zip(cfg.ngram_table_offsets, cfg.ngram_table_sizes))]
        layout["embed.ngram_proj"] = [Piece(f"model.ngram_embeddings.post_projs.{s}.weight", (s,), True)
                                      for s in range(cfg.num_ngram_tables)]
    return layout


def zero_expert_stubs(cfg: ModelConfig) -> list[tuple[str, tuple[int, int]]]:
    """(key, shape) of the gate/up projections `transformers` holds for the zero experts.

    `LongcatFlashForCausalLM` packs gate/up of all E + Z experts into one parameter and refuses a
    checkpoint without the zero experts' rows, although they are never used; an export therefore
    writes them, zero-filled. The N-gram model's remote code builds on that trunk, so it needs them too.
    """
    shape = (cfg.expert_ffn_hidden_size, cfg.hidden_size)
    return [(f"model.layers.{l}.mlp.experts.{e}.{proj}.weight", shape) for l in range(cfg.num_layers)
            for e in range(cfg.n_routed_experts, cfg.num_experts) for proj in ("gate_proj", "up_proj")]


def is_ignored_hf_key(key: str, cfg: ModelConfig) -> bool:
    """Keys an importer skips: model.mtp.* and experts >= n_routed_experts (transformers writes
    unused gate/up projections for the zero experts)."""
    if IGNORED_KEY.match(key):
        return True
    match = EXPERT_KEY.match(key)
    return bool(match) and int(match.group(2)) >= cfg.n_routed_experts
