"""Batch generation: one prefill of the whole batch, then a compiled decode loop over fixed shapes.

The model owns its modes (lite/model.py: `LongcatModel.prefill`, `LongcatModel.decode_step`, the
`DecodeCache` and the packed prompt layout `PackedPrompts` / `pack_prompts`); this module samples from
their logits (`Sampling`, `filter_logits`, `greedy`, `sample`) and runs them in a loop (`Generator`).
Every row has its own sampling settings and seed (`RowSampling`), so one batch mixes requests.

Prefill gets the prompts packed into rows, each prompt its own segment, so that it computes no
padding between them and nothing crosses from one prompt to another (attention, positions, the
N-gram hash). The cache is per prompt: row b holds its prompt in [0, lengths[b]) and the slots past
lengths[b] are never attended to. Shapes are bucketed (batch, prompt length, cache length and the
new-token buffer rounded up to powers of two, packed rows to a multiple of 8) and every compiled
program is kept, so batches of the same bucket never recompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lite.config import ModelConfig
from lite.model import DecodeCache, LongcatModel, PackedPrompts, pack_prompts
from sharding.rules import state_shardings


def _host(x: jax.Array) -> np.ndarray:
    """A device array's value on this host, gathered from every process when it spans several."""
    return np.asarray(x) if x.is_fully_addressable else np.asarray(multihost_utils.process_allgather(x, tiled=True))


class DecodeError(ValueError):
    """Bad generation input (prompts, sampling settings); the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Sampling.

@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        # inf would divide every logit to 0 (uniform sampling), NaN compares false everywhere: both garbage.
        if not (_is_number(self.temperature) and 0 <= self.temperature < math.inf):
            raise DecodeError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise DecodeError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise DecodeError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RowSampling(NamedTuple):
    """Each row's sampling settings and PRNG key, as device arrays: one batch mixes greedy and sampled
    rows with different filters. Row b's token at step s is drawn with fold_in(key[b], s), so a row's
    tokens depend on its own seed only, never on the other rows of its batch."""

    temperature: jax.Array  # float32[B], 0 = greedy
    top_k: jax.Array  # int32[B], 0 = off
    top_p: jax.Array  # float32[B], 1 = off
    key: jax.Array  # uint32[B, 2]: key data (jax.random.key_data) of each row's seed


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """What a batch needs compiled (static): any sampled row, any row with a filter."""

    sampled: bool = False
    filtered: bool = False


def filter_logits(logits: jax.Array, top_k: int | jax.Array, top_p: float | jax.Array) -> jax.Array:
    """float32[B, V]: -inf outside the top_k largest and outside the smallest set of most likely
    tokens whose probability reaches top_p (top_k is applied first); ties at a cut are kept.
    top_k (int32[B] or one for all, 0 = off) and top_p (float32[B] or one for all, 1 = off) may differ by row."""
    batch, vocab = logits.shape
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (batch,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, logits.dtype), (batch,))
    descending = -jnp.sort(-logits, axis=-1)
    kth = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab) - 1
    threshold = jnp.take_along_axis(descending, kth[:, None], axis=-1)[:, 0]  # the smallest logit when off
    descending = jnp.where(descending >= threshold[:, None], descending, -jnp.inf)
    probs = jax.nn.softmax(descending, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1), 1)  # the most likely token always stays
    nucleus = jnp.take_along_axis(descending, keep[:, None] - 1, axis=-1)[:, 0]
    # top_p 1 is off exactly: a float cumsum may reach 1 before the last tokens.
    threshold = jnp.where(top_p < 1, jnp.maximum(threshold, nucleus), threshold)
    return jnp.where(logits >= threshold[:, None], logits, -jnp.inf)


def greedy(logits: jax.Array) -> jax.Array:
    """float32[B, V] -> int32[B]: the first index of each row's largest logit, as argmax gives. Written as
    a max and a min because XLA:CPU runs argmax (one reduce over value, index pairs) far slower: 160 vs
    19 us at [64, 512]. A row without a match (NaN) gets V - 1, still a valid id."""
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(logits == best, jnp.arange(vocab, dtype=jnp.int32), vocab - 1), axis=-1)


def sample(logits: jax.Array, rows: RowSampling, step: jax.Array, mode: SamplingMode) -> jax.Array:
    """float32[B, V] -> int32[B]: each row greedy or drawn with its own settings and key at this step."""
    chosen = greedy(logits)
    if not mode.sampled:
        return chosen
    sampled = rows.temperature > 0
    scaled = logits / jnp.where(sampled, rows.temperature, 1.0)[:, None]
    if mode.filtered:
        scaled = filter_logits(scaled, rows.top_k, rows.top_p)
    keys = jax.vmap(lambda data: jax.random.fold_in(jax.random.wrap_key_data(data), step))(rows.key)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)
    return jnp.where(sampled, drawn, chosen)


def row_sampling(settings: Sequence[Sampling], seeds: Sequence[int]) -> tuple[dict[str, np.ndarray], SamplingMode]:
    """Host arrays of RowSampling's fields for these rows, and the mode they need compiled."""
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(seed))) for seed in seeds])
    arrays = dict(temperature=np.array([s.temperature for s in settings], np.float32),
                  top_k=np.array([min(s.top_k, 2**31 - 1) for s in settings], np.int32),
                  top_p=np.array([s.top_p for s in settings], np.float32), key=keys)
    sampled = [s for s in settings if s.temperature > 0]
    return arrays, SamplingMode(bool(sampled), any(s.top_k > 0 or s.top_p < 1 for s in sampled))


# ---------------------------------------------------------------------------------------------
# The generation loop.

RUNNING, EOS, LENGTH, STOP_STRING = 0, 1, 2, 3


class Generation(NamedTuple):
    """Everything the compiled loop carries; B rows, room for M new tokens each."""

    cache: DecodeCache
    tokens: jax.Array  # int32[B, M]: column s holds the token sampled at step s, -1 where none
    num_tokens: jax.Array  # int32[B] new tokens kept (an EOS ends a row and is not kept)
    last: jax.Array  # int32[B]: the token to feed next
    done: jax.Array  # bool[B]
    reason: jax.Array  # int32[B]: RUNNING, EOS or LENGTH
    step: jax.Array  # int32[]: tokens sampled so far per row
    sampling: RowSampling


def _record(gen: Generation, sampled: jax.Array, limits: jax.Array, eos_token_id: int) -> Generation:
    active = ~gen.done
    is_eos = active & (sampled == eos_token_id)
    kept = active & ~is_eos
    num_tokens = gen.num_tokens + kept
    at_limit = kept & (num_tokens >= limits)
    reason = jnp.where(is_eos, EOS, jnp.where(at_limit, LENGTH, gen.reason))
    tokens = gen.tokens.at[:, gen.step].set(jnp.where(kept, sampled, -1))
    return gen._replace(tokens=tokens, num_tokens=num_tokens, last=sampled, done=gen.done | is_eos | at_limit,
                        reason=reason, step=gen.step + 1)


def _usable(logits: jax.Array, vocab_limit: int | None) -> jax.Array:
    """-inf for ids >= vocab_limit (a tokenizer smaller than the model's vocabulary cannot decode them)."""
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


def _start(model: LongcatModel, prompts: PackedPrompts, limits: jax.Array, sampling: RowSampling, *,
           cache_len: int, max_new: int, mode: SamplingMode, vocab_limit: int | None) -> Generation:
    """Prefill and sample the first token."""
    logits, cache = model.prefill(prompts, cache_len)
    logits = _usable(logits, vocab_limit)
    batch = prompts.lengths.shape[0]
    gen = Generation(cache, jnp.full((batch, max_new), -1, jnp.int32), jnp.zeros((batch,), jnp.int32),
                     jnp.zeros((batch,), jnp.int32), limits <= 0, jnp.zeros((batch,), jnp.int32),
                     jnp.zeros((), jnp.int32), sampling)
    return _record(gen, sample(logits, sampling, gen.step, mode), limits, model.cfg.eos_token_id)


def _continue(model: LongcatModel, gen: Generation, limits: jax.Array, until: jax.Array, *,
              mode: SamplingMode, vocab_limit: int | None) -> Generation:
    """Decode until step `until` (traced: chunk sizes do not recompile) or until every row is done."""
    def running(gen):
        return (gen.step < until) & ~jnp.all(gen.done)

    def one_step(gen):
        logits, cache = model.decode_step(gen.cache, gen.last)
        # Finished rows keep their length, so their cache never grows past its bucket.
        cache = cache._replace(lengths=jnp.where(gen.done, gen.cache.lengths, cache.lengths))
        sampled = sample(_usable(logits, vocab_limit), gen.sampling, gen.step, mode)
        return _record(gen._replace(cache=cache), sampled, limits, model.cfg.eos_token_id)

    return jax.lax.while_loop(running, one_step, gen)


@dataclasses.dataclass
class Completion:
    token_ids: list[int]  # new tokens, without the EOS that ended the row
    stop_reason: str  # "eos", "stop_string", "max_new_tokens" or "context_window"
    text: str | None = None  # the text the tokens add after the prompt's; with a stop string, up to it


@dataclasses.dataclass
class GenerationStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens from decode steps (the first new token of a row comes from prefill)
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


def prompt_problem(prompt: Sequence[int], cfg: ModelConfig) -> str | None:
    """Why one prompt cannot be decoded ("is empty", ...), or None."""
    context = cfg.max_position_embeddings
    if len(prompt) == 0:
        return "is empty"
    if len(prompt) >= context:
        return (f"is {len(prompt)} tokens long; the context window is {context} tokens, "
                f"so a prompt may have at most {context - 1}")
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        return f"has token ids outside [0, {cfg.vocab_size}): {bad[:5]}"
    return None


def check_prompts(prompts: Sequence[Sequence[int]], cfg: ModelConfig) -> None:
    """One clear error for a batch that cannot be decoded."""
    if len(prompts) == 0:
        raise DecodeError("no prompts to decode: the prompt list is empty")
    for i, prompt in enumerate(prompts):
        problem = prompt_problem(prompt, cfg)
        if problem:
            raise DecodeError(f"prompt {i} {problem}")


def check_seed(seed: int) -> None:
    """jax.random.key takes a 64-bit integer."""
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise DecodeError(f"seed must be an integer in [0, 2^63), got {seed!r}")


def completion_text(detokenize: Callable[[list[int]], str], prompt: Sequence[int], new: Sequence[int],
                    prompt_text: str | None = None) -> str:
    """The text `new` adds after `prompt`: both decoded together, the prompt's own text cut off. Decoding
    `new` alone would drop the leading space of its first token (SentencePiece and Metaspace tokenizers
    strip it at the start of a text); this way prompt text + completion text = the text of all the ids.
    prompt_text: detokenize(prompt), when already known."""
    prompt_text = detokenize(list(prompt)) if prompt_text is None else prompt_text
    whole = detokenize([*prompt, *new])
    return whole[len(prompt_text):] if whole.startswith(prompt_text) else detokenize(list(new))


def _per_row(value, n: int, name: str, is_one: Callable[[object], bool]) -> list:
    """One value for every row, or a sequence of exactly one per row."""
    if is_one(value):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise DecodeError(f"{name} has {len(values)} values for {n} prompts")
    return values


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def generation_programs(graphdef: nnx.GraphDef, vocab_limit: int | None = None):
    """The Generator's two jitted programs, of the model state (nnx.split(model)'s second part):
    start(state, prompts, limits, sampling, *, cache_len, max_new, mode) -> Generation (prefill and
    the first token) and continue(state, gen, limits, until, *, mode) -> Generation (the decode
    loop; gen is donated). lite.plan compiles the decode loop from here for a pod's devices."""
    start = jax.jit(lambda state, *args, **kw: _start(nnx.merge(graphdef, state), *args, vocab_limit=vocab_limit, **kw),
                    static_argnames=("cache_len", "max_new", "mode"))
    decode = jax.jit(lambda state, *args, **kw: _continue(nnx.merge(graphdef, state), *args, vocab_limit=vocab_limit,
                                                          **kw),
                     static_argnames=("mode",), donate_argnums=(1,))
    return start, decode


class Generator:
    """Batch generation with one model; keeps one compiled prefill and decode loop per bucket.

    vocab_limit: only ids below it are ever generated (a tokenizer with fewer pieces than the model's
    vocabulary, as train.py's may have, cannot decode the others)."""

    def __init__(self, model: LongcatModel, vocab_limit: int | None = None, mesh: jax.sharding.Mesh | None = None):
        """mesh: decode sharded (sharding/: experts split, N-gram rows split, batch over every axis)."""
        self.cfg, self.mesh = model.cfg, mesh
        graphdef, self.state = nnx.split(model)
        if mesh is not None:
            self.state = jax.device_put(self.state, state_shardings(self.state, mesh))
        self._start, self._continue = generation_programs(graphdef, vocab_limit)
        self.compiled: dict[tuple, Callable] = {}  # (program, shapes, sampling) -> executable

    def _compiled(self, name: str, jitted, *args, stats: GenerationStats, **static):
        key = (name, tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)), tuple(sorted(static.items())))
        if key not in self.compiled:
            began = time.perf_counter()
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                self.compiled[key] = jitted.lower(self.state, *args, **static).compile()
            stats.compile_seconds += time.perf_counter() - began
        return self.compiled[key]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampling: Sampling | Sequence[Sampling] = Sampling(), seed: int | Sequence[int] = 0,
                 stop_strings: Sequence[str] | Sequence[Sequence[str]] = (),
                 detokenize: Callable[[list[int]], str] | None = None,
                 chunk: int = 16) -> tuple[list[Completion], GenerationStats]:
        """Token-id prompts -> one Completion each. max_new_tokens, sampling, seed and stop_strings are
        each one value for every row or a sequence of one per row (stop strings: a list of strings, or a
        list of such lists); an int seed s gives row i the seed s + i. A row's tokens depend only on its
        prompt, settings and seed, not on the rest of the batch. Each row stops on its own: at EOS, at
        its first stop string (checked by `detokenize` every `chunk` steps), at its max_new_tokens, or
        at the context window. With `detokenize`, each Completion has its text (see completion_text)."""
        cfg = self.cfg
        check_prompts(prompts, cfg)
        n = len(prompts)
        requested = _per_row(max_new_tokens, n, "max_new_tokens", _is_int)
        for m in requested:
            if not (_is_int(m) and m >= 1):
                raise DecodeError(f"max_new_tokens must be an integer >= 1, got {m!r}")
        settings = _per_row(sampling, n, "sampling", lambda value: isinstance(value, Sampling))
        if _is_int(seed):
            check_seed(seed)
            seeds = [(seed + i) % 2**63 for i in range(n)]
        else:
            seeds = _per_row(seed, n, "seed", _is_int)
            for s in seeds:
                check_seed(s)
        if all(isinstance(s, str) for s in stop_strings):
            stops = [list(stop_strings)] * n
        else:
            stops = [[row] if isinstance(row, str) else list(row)
                     for row in _per_row(stop_strings, n, "stop_strings", lambda _: False)]
        if any(s == "" or not isinstance(s, str) for row in stops for s in row):
            raise DecodeError("a stop string is empty or not a string")
        if any(stops) and detokenize is None:
            raise DecodeError("stop strings need a detokenize function")
        stats = GenerationStats()
        context = cfg.max_position_embeddings
        lengths = np.array([len(p) for p in prompts], np.int32)
        requested = np.array([min(m, context) for m in requested], np.int32)
        limits = np.minimum(requested, context - lengths)  # no row generates past the context window
        # On a mesh every device holds a slice of the batch (and of the packed rows): at least one row each.
        devices = 1 if self.mesh is None else self.mesh.size
        batch, prompt_len = bucket(n, devices), bucket(int(lengths.max()), 16)
        max_new = bucket(int(limits.max()), 16)  # allocate no more than the longest row may use
        cache_len = bucket(int((lengths + limits).max()), 16)
        filler = [[cfg.bos_token_id]] * (batch - n)  # one token, no room to generate
        packed = pack_prompts([*prompts, *filler], prompt_len, math.lcm(8, devices))
        limits = np.concatenate([limits, np.zeros(batch - n, limits.dtype)]).astype(np.int32)
        rows, mode = row_sampling([*settings, *[Sampling()] * (batch - n)], [*seeds, *[0] * (batch - n)])
        args = (PackedPrompts(*map(self._put, packed)), self._put(limits),
                RowSampling(**{name: self._put(value) for name, value in rows.items()}))

        start = self._compiled("start", self._start, *args, stats=stats, cache_len=cache_len, max_new=max_new,
                               mode=mode)
        began = time.perf_counter()
        gen = jax.block_until_ready(start(self.state, *args))
        stats.prefill_seconds = time.perf_counter() - began
        stats.prefill_tokens = int(lengths.sum())

        prompt_texts = [detokenize(list(p)) for p in prompts] if detokenize else None
        text = lambda i, ids: completion_text(detokenize, prompts[i], ids, prompt_texts[i])  # noqa: E731
        step_size = chunk if any(stops) else max_new
        stopped_at: dict[int, tuple[int, str]] = {}  # row -> (tokens kept, text) where a stop string ended it
        checked = [0] * n  # tokens of each row already searched for its stop strings
        while True:
            if any(stops):
                self._find_stop_strings(gen, stops, text, stopped_at, checked)
                if stopped_at:
                    done = _host(gen.done).copy()
                    done[list(stopped_at)] = True
                    gen = gen._replace(done=self._put(done))
            if bool(_host(gen.done).all()):
                break
            until = self._put(np.int32(min(int(_host(gen.step)) + step_size, max_new)))
            run = self._compiled("continue", self._continue, gen, limits, until, stats=stats, mode=mode)
            began = time.perf_counter()
            gen = jax.block_until_ready(run(self.state, gen, limits, until))
            stats.decode_seconds += time.perf_counter() - began

        tokens, num_tokens, reasons = (_host(x) for x in (gen.tokens, gen.num_tokens, gen.reason))
        completions = []
        for i in range(n):
            ids = [int(t) for t in tokens[i] if t >= 0]
            if i in stopped_at:
                kept, cut = stopped_at[i]
                completions.append(Completion(ids[:kept], "stop_string", cut))
                continue
            if reasons[i] == EOS:
                reason = "eos"
            else:
                reason = "max_new_tokens" if len(ids) >= requested[i] else "context_window"
            completions.append(Completion(ids, reason, text(i, ids) if detokenize else None))
        sampled = num_tokens[:n] + (reasons[:n] == EOS)  # what the device produced, before stop-string trimming
        stats.decode_tokens = int(np.maximum(sampled - 1, 0).sum())  # the first token of a row comes from prefill
        return completions, stats

    def _put(self, value) -> jax.Array:
        """A host value as the compiled programs take it: on several processes an array every process
        holds whole (each passes the same value), so that it can meet the state spanning them all."""
        if self.mesh is None or jax.process_count() == 1:
            return jnp.asarray(value)
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, NamedSharding(self.mesh, PartitionSpec()),
                                            lambda index: value[index])

    @staticmethod
    def _find_stop_strings(gen: Generation, stops: Sequence[Sequence[str]], text: Callable[[int, list[int]], str],
                           stopped_at: dict, checked: list[int]) -> None:
        """Rows whose text now holds one of their stop strings -> stopped_at[row] = (the fewest tokens
        whose text holds it, the text before the first one)."""
        tokens = _host(gen.tokens)
        for i, row_stops in enumerate(stops):
            if i in stopped_at or not row_stops:
                continue
            ids = [int(t) for t in tokens[i] if t >= 0]
            whole = text(i, ids)
            hits = [whole.find(s) for s in row_stops if s in whole]
            if hits:  # not in the first checked[i] tokens' text, else it would have stopped then
                kept = next(k for k in range(checked[i] + 1, len(ids) + 1)
                            if any(s in text(i, ids[:k]) for s in row_stops))
                stopped_at[i] = (kept, whole[: min(hits)])
            checked[i] = len(ids)
