"""Cached batch decoding against the full-sequence forward, and the sampling filters against NumPy."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lite import decode
from lite.config import get_config
from lite.decode import DecodeError, Generator, Sampling
from lite.checkpoint import model_from_arrays, model_state_arrays
from lite.model import LongcatModel, PackedPrompts, pack_prompts

# A larger init than the default so attention is far from uniform and logits are O(1): a masking or
# cache slip shows up far above the 1e-5 tolerance.
CFG = get_config("tiny", initializer_range=0.1, max_position_embeddings=40)
EOS = CFG.eos_token_id


@functools.lru_cache(maxsize=None)
def model_and_forward(cfg=CFG):
    """The model and its full-sequence forward (the reference): tokens, segment_ids -> logits."""
    model = LongcatModel(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda tokens, segments: nnx.merge(graphdef, state)(tokens, segments).logits)
    return model, forward


def reference_logits(forward, rows: list[list[int]], width: int = 40) -> list[np.ndarray]:
    """Full recompute of every row, right-padded into one fixed shape: logits at each row's last token."""
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)], segments[b, : len(row)] = row, 1
    logits = np.asarray(forward(jnp.asarray(tokens), jnp.asarray(segments)))
    return [logits[b, len(row) - 1] for b, row in enumerate(rows)]


def naive_greedy(forward, prompt: list[int], max_new: int, cfg=CFG) -> tuple[list[int], str]:
    """Greedy decoding by recomputing the whole sequence for every token."""
    seq, new = list(prompt), []
    while len(new) < max_new:
        if len(seq) >= cfg.max_position_embeddings:
            return new, "context_window"
        token = int(np.argmax(reference_logits(forward, [seq])[0]))
        if token == cfg.eos_token_id:
            return new, "eos"
        new.append(token)
        seq.append(token)
    return new, "max_new_tokens"


def test_cached_logits_equal_full_recompute_at_every_step():
    model, forward = model_and_forward()
    rng = np.random.default_rng(0)
    prompts = [[1, 7, 9], [1, 30, 31, EOS, 40, 41, 42, 43, 44, 45], [1] + rng.integers(3, 512, 16).tolist()]
    # Fed tokens (teacher forcing), with an EOS in row 0 so the N-gram cache must restart mid-decode.
    fed = rng.integers(3, 512, (3, 8)).astype(np.int32)
    fed[0, 3] = EOS
    packed = pack_prompts(prompts, 24, row_multiple=1)
    assert packed.tokens.shape == (2, 24) and set(packed.row) == {0, 1}  # two prompts share a row
    padding = packed.segment_ids == 0
    packed.tokens[padding] = rng.integers(3, 512, padding.sum())  # padding holds junk, not zeros
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda p: nnx.merge(graphdef, state).prefill(p, 40))
    step = jax.jit(lambda cache, t: nnx.merge(graphdef, state).decode_step(cache, t))

    logits, cache = prefill(PackedPrompts(*map(jnp.asarray, packed)))
    # Only the latent and the RoPE key, per attention block.
    assert [a.shape for a in cache.kv] == [(3, 40, CFG.kv_lora_rank + CFG.qk_rope_head_dim)] * (2 * CFG.num_layers)
    rows = [list(p) for p in prompts]
    for s in range(fed.shape[1] + 1):
        want = np.stack(reference_logits(forward, rows))
        assert np.std(want) > 0.1
        np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=0, err_msg=f"step {s}")
        if s < fed.shape[1]:
            logits, cache = step(cache, jnp.asarray(fed[:, s]))
            for b in range(3):
                rows[b].append(int(fed[b, s]))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [len(r) for r in rows])


@functools.lru_cache(maxsize=None)
def eos_setup():
    """A config whose EOS is a token greedy decoding emits for one prompt but not the other, so rows
    stop at different times; prompts at three lengths, one with an EOS inside, one near the context
    window (40). Returns the config, its full forward, the prompts, a Generator and its greedy batch."""
    model, forward = model_and_forward()
    prompts = [[1, 7, 9, 11, 13], [1, 30, 31, EOS, 40, 41, 42, 43], [1] + list(range(100, 135))]
    outputs = [naive_greedy(forward, p, 8)[0] for p in prompts[:2]]
    in_prompts = {t for p in prompts for t in p}
    candidates = [t for t in outputs[0][1:] if t not in outputs[1] and t not in in_prompts]
    assert candidates, outputs
    # Same weights; up to the first EOS emitted the hash equals the old config's (no prompt holds it).
    cfg = CFG.replace(eos_token_id=candidates[0])
    model = model_from_arrays(cfg, {k: np.asarray(v) for k, v in model_state_arrays(model).items()})
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda tokens, segments: nnx.merge(graphdef, state)(tokens, segments).logits)
    generator = Generator(model)
    return cfg, forward, prompts, generator, generator.generate(prompts, 8)


def test_greedy_batch_equals_naive_loop_and_each_row_alone():
    cfg, forward, prompts, generator, (batch, stats) = eos_setup()
    want = [naive_greedy(forward, p, 8, cfg) for p in prompts]
    assert [(c.token_ids, c.stop_reason) for c in batch] == want
    assert [c.stop_reason for c in batch] == ["eos", "max_new_tokens", "context_window"]
    # Alone, the row near the context window is the only one: it still stops for the window.
    alone = generator.generate([prompts[2]], 8)[0][0]
    assert (alone.token_ids, alone.stop_reason) == (batch[2].token_ids, "context_window")
    assert stats.prefill_tokens == sum(map(len, prompts))
    # Tokens from decode steps: everything sampled (EOS included) but each row's first token.
    assert stats.decode_tokens == sum(len(c.token_ids) + (c.stop_reason == "eos") - 1 for c in batch)


def test_stop_strings_and_no_recompilation_within_a_bucket():
    cfg, forward, prompts, generator, (first, _) = eos_setup()
    detokenize = lambda ids: "".join(f"<{t}>" for t in ids)  # noqa: E731
    programs = len(generator.compiled)  # the batch's prefill and decode loop, compiled by eos_setup
    # The same bucket (batch 4, longest prompt 33..64 tokens, cache 64) with other prompts and lengths.
    generator.generate([[1, 50, 51], [1] + list(range(200, 234)), [1, 60, 61, 62]], 8)
    target = first[1].token_ids[4]  # the stop string is the 5th token of row 1
    cut = first[1].token_ids.index(target)
    stopped, _ = generator.generate(prompts, 8, stop_strings=[f"<{target}>"], detokenize=detokenize, chunk=2)
    assert len(generator.compiled) == programs  # nothing new for other prompts, lengths or stop strings
    assert stopped[1].stop_reason == "stop_string"
    assert stopped[1].token_ids == first[1].token_ids[: cut + 1]
    assert stopped[1].text == detokenize(first[1].token_ids[:cut])
    for row in (0, 2):
        if f"<{target}>" not in detokenize(first[row].token_ids):
            assert (stopped[row].token_ids, stopped[row].stop_reason) == (first[row].token_ids, first[row].stop_reason)


def test_seeded_sampling_is_reproducible():
    cfg, forward, prompts, generator, _ = eos_setup()
    sampling = Sampling(temperature=1.5, top_k=50, top_p=0.95)
    runs = [[c.token_ids for c in generator.generate(prompts, 8, sampling, seed=seed)[0]] for seed in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_each_row_has_its_own_settings_and_the_batch_does_not_change_it():
    """One batch: two sampled rows with their own filters and seeds, a greedy row with its own
    max_new_tokens. A sampled row decoded alone, with its seed, gives the same tokens; the greedy row
    equals the naive loop; an int seed s gives row i the seed s + i."""
    cfg, forward, prompts, generator, _ = eos_setup()
    settings = [Sampling(temperature=1.5, top_k=50), Sampling(temperature=1.0, top_p=0.9), Sampling()]
    batch, _ = generator.generate(prompts, [8, 8, 3], settings, seed=[11, 12, 0])
    for row, seed in ((0, 11), (1, 12)):  # alone: one more bucket (batch 1, prompts up to 16 tokens)
        alone, _ = generator.generate([prompts[row]], 8, settings[row], seed=[seed])
        assert (alone[0].token_ids, alone[0].stop_reason) == (batch[row].token_ids, batch[row].stop_reason)
    assert batch[0].token_ids != batch[1].token_ids
    assert (batch[2].token_ids, batch[2].stop_reason) == naive_greedy(forward, prompts[2], 3, cfg)
    shared, _ = generator.generate(prompts, 8, settings[1], seed=11)
    assert shared[1].token_ids == batch[1].token_ids
    with pytest.raises(DecodeError, match="max_new_tokens has 2 values for 3 prompts"):
        generator.generate(prompts, [3, 8], settings)


def numpy_keep(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """bool[V]: the tokens top-k then top-p sampling may pick, by sorting in NumPy."""
    order = np.argsort(-logits, kind="stable")
    keep = np.zeros(logits.shape, bool)
    allowed = order[: top_k] if top_k else order
    probs = np.exp(logits[allowed] - logits[allowed].max())
    probs /= probs.sum()
    mass = 0.0
    for token, p in zip(allowed, probs):
        keep[token] = True
        mass += p
        if mass >= top_p:
            break
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (7, 0.3), (3, 0.999), (100, 0.9)])
def test_filter_logits_keeps_what_numpy_keeps(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(0, 2, (4, 60)).astype(np.float32)
    got = np.asarray(decode.filter_logits(jnp.asarray(logits), top_k, top_p))
    for row, out in zip(logits, got):
        keep = numpy_keep(row, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(out), keep)
        np.testing.assert_array_equal(out[keep], row[keep])


def test_filter_logits_per_row_settings():
    """Each row of one batch filtered with its own top_k / top_p, as NumPy filters it alone."""
    settings = [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (7, 0.3), (3, 0.999), (100, 0.9), (2, 0.1)]
    logits = np.random.default_rng(1).normal(0, 2, (len(settings), 60)).astype(np.float32)
    top_k, top_p = (np.array(column) for column in zip(*settings))
    got = np.asarray(decode.filter_logits(jnp.asarray(logits), jnp.asarray(top_k, jnp.int32),
                                          jnp.asarray(top_p, jnp.float32)))
    for row, out, (k, p) in zip(logits, got, settings):
        keep = numpy_keep(row, k, p)
        np.testing.assert_array_equal(np.isfinite(out), keep, err_msg=f"top_k {k}, top_p {p}")
        np.testing.assert_array_equal(out[keep], row[keep])


def test_sampling_frequencies_follow_the_filtered_distribution():
    """Row 0 samples at temperature 2 from its top 4; row 1, in the same batch, is greedy."""
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]] * 2)
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), 20000))
    rows = lambda key: decode.RowSampling(jnp.asarray([2.0, 0.0]), jnp.asarray([4, 0]),  # noqa: E731
                                          jnp.asarray([1.0, 0.5]), jnp.stack([key, key]))
    draws = np.asarray(jax.vmap(lambda key: decode.sample(logits, rows(key), jnp.int32(0),
                                                          decode.SamplingMode(True, True)))(keys))
    probs = np.exp(np.array([2.0, 1.5, 1.0, 0.5]) / 2.0)
    probs /= probs.sum()
    counts = np.bincount(draws[:, 0], minlength=6) / len(draws)
    np.testing.assert_allclose(counts[:4], probs, atol=0.015)
    assert counts[4:].sum() == 0
    assert (draws[:, 1] == 0).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must lie in (0, 1]"),
    (dict(top_p=1.5), "top_p must lie in (0, 1]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
])
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(DecodeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        Sampling(**kwargs)


@pytest.mark.parametrize("prompts,message", [
    ([], "the prompt list is empty"),
    ([[1, 2], []], "prompt 1 is empty"),
    ([[1] * 40], "prompt 0 is 40 tokens long; the context window is 40 tokens"),
    ([[1, 512]], r"prompt 0 has token ids outside \[0, 512\)"),
])
def test_bad_prompts(prompts, message):
    with pytest.raises(DecodeError, match=message):
        decode.check_prompts(prompts, CFG)


def test_the_decode_loop_computes_nothing_from_the_layer_weights_before_it_starts():
    """The Generator's compiled decode loop reads the stacked layer weights inside the loop (the
    grouped matmuls at a layer of the stack, the rest sliced per step), so nothing outside the
    `while` reads them: a slice or copy made there (per-layer weights made before the loop, or
    slices XLA hoisted out of it) is a second copy of every layer's weights held while the loop runs.
    The loop's result is checked against the full forward by the tests above; this checks its program."""
    model = LongcatModel(get_config("tiny", num_layers=3), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    start, loop = decode.generation_programs(graphdef)  # what the Generator compiles
    prompts = PackedPrompts(*map(jnp.asarray, pack_prompts([[1, 5, 9], [1, 7]], 8)))
    limits, mode = jnp.asarray([4, 4], jnp.int32), decode.SamplingMode()
    sampling = decode.RowSampling(**decode.row_sampling([Sampling()] * 2, [0, 1])[0])
    gen = jax.eval_shape(functools.partial(start, cache_len=16, max_new=8, mode=mode), state, prompts, limits, sampling)
    hlo = loop.lower(state, gen, limits, jnp.int32(4), mode=mode).compile().as_text()
    entry = hlo[hlo.index("\nENTRY "):]
    entry = entry[: entry.index("\n}")]
    weights = set(re.findall(r"(%state__layers_\S*) = \S+ parameter\(", entry))
    assert len(weights) == len(jax.tree.leaves(nnx.state(model.layers))), entry[:2000]
    readers = [line for line in entry.splitlines()[1:] if "parameter(" not in line
               and any(re.search(re.escape(name) + r"[,)]", line) for name in weights)]
    assert readers and all(re.search(r"\s(tuple|while)\(%", line) for line in readers), "\n".join(readers)[:3000]
