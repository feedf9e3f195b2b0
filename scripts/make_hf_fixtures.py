"""Write tests/fixtures/hf/: tiny random checkpoints saved by `transformers` and what it computes on them.

    pip install torch==2.13.0 transformers   # not project dependencies: only this script needs them
    python scripts/make_hf_fixtures.py [--out tests/fixtures/hf] [--seed 0]

Cases (float32, random weights large enough that logits and routing are far from uniform):
  plain  LongcatFlashForCausalLM, default RoPE, config.json as transformers >= 5 writes it
  yarn   the same with YaRN RoPE (mscale != mscale_all_dim, prompts longer than the original context)
  ngram  a LongCat-Flash-Lite-style checkpoint: the plain keys plus model.ngram_embeddings.* (and an
         ignored model.mtp.* tensor), model_type longcat_flash_ngram, legacy rope_theta, two shards.
         `transformers` has no N-gram class, so its logits come from LongcatFlashForCausalLM fed the
         embeddings of the NumPy reference in tests/test_convert_ngram.py (inputs_embeds).
Every case has a random e_score_correction_bias that changes which experts are chosen, and zero
experts are chosen; the script checks both and refuses to write fixtures where either fails.
Each case directory holds the checkpoint and expected.npz: tokens, logits, greedy prompt and
tokens (generate() with an explicit all-ones attention mask) and the experts the reference chose.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ("plain", "yarn", "ngram")
BATCH, LENGTH, PROMPT, NEW_TOKENS = 2, 24, 6, 8
NGRAM = dict(emb_neighbor_num=3, emb_split_num=2, ngram_vocab_size_ratio=2)


def _ngram_reference():
    spec = importlib.util.spec_from_file_location("test_convert_ngram", ROOT / "tests" / "test_convert_ngram.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ngram_embedding_reference


def hf_config(case: str) -> LongcatFlashConfig:
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if case == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32.0, "beta_slow": 1.0}
    return LongcatFlashConfig(
        vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
        qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=8, ffn_hidden_size=48,
        n_routed_experts=4, zero_expert_num=3, moe_topk=3, expert_ffn_hidden_size=16, routed_scaling_factor=1.5,
        max_position_embeddings=64, rope_parameters=rope, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, dtype="float32", attn_implementation="eager")


def _randomize(model: LongcatFlashForCausalLM, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            else:  # activations of order one; a sharper router so routing is far from uniform
                scale = (3.0 if "classifier" in name else 1.0) / p.shape[-1] ** 0.5
                p.copy_(scale * torch.randn(p.shape, generator=generator))
        for layer in model.model.layers:
            bias = layer.mlp.router.e_score_correction_bias
            bias.copy_(0.3 * (torch.rand(bias.shape, generator=generator) - 0.5))


def _record_routing(model: LongcatFlashForCausalLM) -> list:
    calls = []
    for layer in model.model.layers:
        layer.mlp.router.register_forward_hook(lambda module, args, out: calls.append(out))
    return calls


def make_case(case: str, out: pathlib.Path, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed + CASES.index(case))
    config = hf_config(case)
    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM(config).eval()
    _randomize(model, generator)
    tokens = torch.randint(3, config.vocab_size, (BATCH, LENGTH), generator=generator)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)

    embed = None  # the ngram case embeds with the NumPy reference instead of model.embed_tokens
    if case == "ngram":
        tokens[0, 9] = tokens[1, 4] = config.eos_token_id  # n-grams restart after an EOS
        s, width = (NGRAM["emb_neighbor_num"] - 1) * NGRAM["emb_split_num"], config.hidden_size // 4
        tables = [torch.randn(NGRAM["ngram_vocab_size_ratio"] * config.vocab_size + 2 * t + 1, width, generator=generator)
                  for t in range(s)]
        projs = [torch.randn(config.hidden_size, width, generator=generator) / width ** 0.5 for _ in range(s)]
        state = load_file(out / "model.safetensors")
        (out / "model.safetensors").unlink()
        state.update({f"model.ngram_embeddings.embedders.{t}.weight": tables[t] for t in range(s)})
        state.update({f"model.ngram_embeddings.post_projs.{t}.weight": projs[t] for t in range(s)})
        state["model.mtp.layers.0.norm.weight"] = torch.ones(config.hidden_size)  # ignored on import
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for file_name, names in shards.items():
            save_file({k: state[k].contiguous() for k in names}, out / file_name, metadata={"format": "pt"})
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}, indent=1))
        hf = json.loads((out / "config.json").read_text())
        rope = hf.pop("rope_parameters")
        hf.update(model_type="longcat_flash_ngram", architectures=["LongcatFlashNgramForCausalLM"],
                  rope_theta=rope["rope_theta"], **NGRAM)
        (out / "config.json").write_text(json.dumps(hf, indent=2))
        reference = _ngram_reference()
        table = state["model.embed_tokens.weight"].numpy()
        numpy_tables, numpy_projs = [t.numpy() for t in tables], [p.numpy() for p in projs]

        def embed_with_reference(ids: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(reference(ids.numpy(), table, numpy_tables, numpy_projs, hf).astype(np.float32))

        embed = embed_with_reference

    routing = _record_routing(model)
    with torch.no_grad():
        inputs = dict(inputs_embeds=embed(tokens)) if embed else dict(input_ids=tokens)
        logits = model(**inputs).logits.numpy()
        choices = np.stack([c[2].numpy() for c in routing])  # [layers, B*L, k]
        unbiased = np.stack([torch.topk(c[0].softmax(-1), config.moe_topk).indices.numpy() for c in routing])
        routing.clear()
        prompt = tokens[:1, :PROMPT]
        if embed is None:
            greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                    do_sample=False, pad_token_id=0)
        else:  # no transformers N-gram class: greedy decoding by full recomputation
            greedy = prompt
            for _ in range(NEW_TOKENS):
                step = model(inputs_embeds=embed(greedy)).logits[:, -1].argmax(-1, keepdim=True)
                greedy = torch.cat([greedy, step], dim=1)
    changed = int(sum((np.sort(a, -1) != np.sort(b, -1)).any(-1).sum() for a, b in zip(choices, unbiased)))
    zero_chosen = int((choices >= config.n_routed_experts).sum())
    if changed == 0 or zero_chosen == 0:
        raise SystemExit(f"{case}: the router bias changed {changed} choices and {zero_chosen} zero experts were "
                         "chosen; both must be > 0 -- try another seed")
    counts = np.stack([np.bincount(c.reshape(-1), minlength=config.n_routed_experts + config.zero_expert_num)
                       for c in choices]).astype(np.float32)
    np.savez(out / "expected.npz", tokens=tokens.numpy().astype(np.int32), logits=logits.astype(np.float32),
             greedy=greedy.numpy().astype(np.int32), prompt_length=PROMPT, expert_counts=counts,
             bias_changed_choices=changed, zero_expert_choices=zero_chosen)
    print(f"{case}: {changed} routing choices changed by the bias, {zero_chosen} zero-expert choices, "
          f"logits std {logits.std():.3f}, greedy {greedy[0, PROMPT:].tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "tests" / "fixtures" / "hf")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for case in CASES:
        make_case(case, args.out / case, args.seed)


if __name__ == "__main__":
    main()
