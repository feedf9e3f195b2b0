"""Corpora, the cached tokenizer and the grain packing pipeline, against plain-Python references."""

import collections
import json
import math

import numpy as np
import pytest

from lite.config import get_config
from lite.data import (DataError, KJV_VALIDATION_BOOKS, encode_documents, kjv_corpus, kjv_path, load_corpus,
                       load_tokenizer, packed_rows, train_tokenizer, training_batches, unigram_entropy,
                       validation_rows_for_process)


def make_docs(count: int, seed: int = 0) -> list[np.ndarray]:
    """Documents whose first token is unique (100 + index), so a token stream can be parsed back."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[100 + i], rng.integers(3, 90, rng.integers(1, 30))]).astype(np.int32)
            for i in range(count)]


def parse_stream(tokens: np.ndarray, docs: list[np.ndarray]) -> list[int]:
    """Split a token stream into whole documents (by their unique first token); fails on any mismatch."""
    order, i = [], 0
    while i < len(tokens):
        doc = docs[int(tokens[i]) - 100]
        assert np.array_equal(tokens[i: i + len(doc)], doc), f"stream differs from document at {i}"
        order.append(int(tokens[i]) - 100)
        i += len(doc)
    return order


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_training_batches_pack_whole_documents_with_segment_ids():
    docs = make_docs(23)
    seq_len, batch = 16, 3
    epoch_tokens = sum(map(len, docs))
    rows_needed = -(-2 * epoch_tokens // seq_len)
    batches = take(iter(training_batches(docs, seq_len, batch, seed=5)), -(-rows_needed // batch))
    tokens = np.concatenate([b["tokens"] for b in batches]).reshape(-1, seq_len)
    segments = np.concatenate([b["segment_ids"] for b in batches]).reshape(-1, seq_len)
    assert tokens.dtype == np.int32 and segments.dtype == np.int32
    assert (segments > 0).all()  # an endless stream is never padded
    stream = tokens.reshape(-1)
    # Epoch 1 and epoch 2 are each every document exactly once, in different shuffled orders.
    first = parse_stream(stream[:epoch_tokens], docs)
    second = parse_stream(stream[epoch_tokens: 2 * epoch_tokens], docs)
    assert sorted(first) == sorted(second) == list(range(len(docs)))
    assert first != second and first != list(range(len(docs)))
    # A segment starts exactly at each row start and each document start, numbered 1, 2, ... per row.
    starts = np.zeros(len(stream), bool)
    starts[np.cumsum([0] + [len(docs[d]) for d in first + second])[:-1]] = True
    starts[::seq_len] = True
    expected = np.cumsum(starts.reshape(-1, seq_len)[: 2 * epoch_tokens // seq_len], axis=1)
    assert np.array_equal(segments[: len(expected)], expected)


def test_training_batches_same_seed_same_batches_and_state_resumes_exactly():
    docs = make_docs(17)
    dataset = training_batches(docs, 12, 2, seed=3)
    reference = take(iter(dataset), 9)
    again = take(iter(training_batches(docs, 12, 2, seed=3)), 9)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(reference, again))
    other_seed = take(iter(training_batches(docs, 12, 2, seed=4)), 9)
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(reference, other_seed))

    iterator = iter(dataset)
    take(iterator, 4)
    state = json.loads(json.dumps(iterator.get_state()))  # as it is stored in a checkpoint
    resumed = iter(training_batches(docs, 12, 2, seed=3))
    resumed.set_state(state)
    for expected, got in zip(reference[4:], take(resumed, 5)):
        assert np.array_equal(expected["tokens"], got["tokens"])
        assert np.array_equal(expected["segment_ids"], got["segment_ids"])


def test_training_batches_shard_documents_by_process():
    docs = make_docs(10)
    seen = []
    for process in range(2):
        share = [docs[i] for i in range(process, 10, 2)]
        tokens = np.concatenate([b["tokens"].reshape(-1) for b in
                                 take(iter(training_batches(docs, 8, 1, seed=0, process_index=process,
                                                            process_count=2)), 20)])
        order = parse_stream(tokens[: sum(map(len, share))], docs)
        assert sorted(order) == list(range(process, 10, 2))
        seen += order
    assert sorted(seen) == list(range(10))


def test_packed_rows_match_a_plain_concat_and_split():
    docs = make_docs(9)
    tokens, segments = packed_rows(docs, 10)
    stream = np.concatenate(docs)
    doc_start = np.zeros(len(stream), bool)
    doc_start[np.cumsum([0] + [len(d) for d in docs])[:-1]] = True
    rows = -(-len(stream) // 10)
    want_tokens = np.zeros(rows * 10, np.int32)
    want_tokens[: len(stream)] = stream
    starts = np.zeros(rows * 10, bool)
    starts[: len(stream)] = doc_start
    starts[::10] = True
    want_segments = np.where(np.arange(rows * 10) < len(stream), 1, 0).reshape(rows, 10)
    want_segments *= np.cumsum(starts.reshape(rows, 10), axis=1)
    assert np.array_equal(tokens, want_tokens.reshape(rows, 10))
    assert np.array_equal(segments, want_segments)


def test_validation_rows_padded_to_whole_global_batches_and_split_by_process():
    tokens = np.arange(1, 6 * 4 + 1, dtype=np.int32).reshape(6, 4)
    segments = np.ones_like(tokens)
    parts = [validation_rows_for_process(tokens, segments, 4, p, 2) for p in range(2)]
    assert all(t.shape == (4, 4) for t, _ in parts)
    rows = {tuple(row) for t, _ in parts for row in t}
    assert rows == {tuple(r) for r in tokens} | {(0, 0, 0, 0)}
    assert sum(int((s == 0).all(axis=1).sum()) for _, s in parts) == 2  # two padding rows, no loss


def test_unigram_entropy_matches_counting():
    docs = [np.array([1, 5, 5, 7], np.int32), np.array([5, 2], np.int32)]
    counts = collections.Counter([1, 5, 5, 7, 5, 2])
    total = sum(counts.values())
    want = -sum(c / total * math.log(c / total) for c in counts.values())
    assert unigram_entropy(docs, 8) == pytest.approx(want, rel=1e-12)


def test_load_corpus_text_jsonl_directories(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n\n  \nthird doc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        "\n".join(json.dumps({"body": f"json doc {i}", "id": i}) for i in range(40)) + "\n")
    (tmp_path / "sub" / "ignored.bin").write_bytes(b"\0\1")
    corpus = load_corpus([tmp_path], text_field="body")
    docs = ["first doc\nline two", "second doc", "third doc"] + [f"json doc {i}" for i in range(40)]
    assert corpus.validation == [docs[19], docs[39]]  # every 20th whole document
    assert corpus.train == [d for i, d in enumerate(docs) if i not in (19, 39)]
    two = load_corpus([tmp_path / "a.txt"])
    assert two.validation == ["third doc"] and len(two.train) == 2


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".txt", "does not exist"),
    ("  \n\n \n", ".txt", "is empty"),
    ('{"text": "ok"}\nnot json\n', ".jsonl", ":2: not a JSON line"),
    ('{"body": "no text field"}\n', ".jsonl", "string field 'text'"),
    ("only one document", ".txt", "at least 2"),
])
def test_load_corpus_errors_name_the_problem(tmp_path, content, suffix, message):
    path = tmp_path / f"corpus{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_corpus([path])


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(DataError, match="holds no"):
        load_corpus([tmp_path])


def test_kjv_holds_out_whole_books():
    corpus = kjv_corpus()
    chapters = collections.Counter()
    for line in kjv_path().read_text().splitlines():
        verse = json.loads(line)
        chapters[verse["book"], verse["chapter"]] += 1
    held_out = sum(1 for book, _ in chapters if book in KJV_VALIDATION_BOOKS)
    assert len(corpus.validation) == held_out > 0
    assert len(corpus.train) + held_out == len(chapters)
    assert corpus.validation[0].startswith("Now it came to pass in the days when the judges ruled")  # Ruth 1:1
    assert not set(corpus.train) & set(corpus.validation)


def test_tokenizer_trained_once_cached_and_round_trips(tmp_path):
    cfg = get_config("tiny")
    texts = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)]
    path = train_tokenizer(texts, cfg, tmp_path)
    mtime = path.stat().st_mtime_ns
    assert train_tokenizer(texts, cfg, tmp_path) == path and path.stat().st_mtime_ns == mtime
    assert train_tokenizer(texts[:-1], cfg, tmp_path) != path  # another corpus: another tokenizer
    sp = load_tokenizer(path)
    assert sp.get_piece_size() <= cfg.vocab_size
    assert (sp.bos_id(), sp.eos_id()) == (cfg.bos_token_id, cfg.eos_token_id)
    assert sp.decode(sp.encode(texts[3])) == texts[3]
    docs = encode_documents(sp, texts[:2], cfg)
    assert docs[0][0] == cfg.bos_token_id and docs[0][-1] == cfg.eos_token_id
    assert list(docs[1][1:-1]) == sp.encode(texts[1])


def test_hf_tokenizer_json_round_trips_and_names_bos_eos(tmp_path):
    """A tokenizer.json directory loads like tokenizer.model: text without the tokenizer's own
    special tokens (BOS is added by id, once), BOS / EOS from tokenizer_config.json."""
    from hf_tokenizer import write_hf_tokenizer

    from lite.data import HFTokenizer, checkpoint_tokenizer

    cfg = get_config("tiny")
    texts = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)]
    write_hf_tokenizer(tmp_path, texts, 300)
    tokenizer = checkpoint_tokenizer(tmp_path, cfg)
    assert isinstance(tokenizer, HFTokenizer)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]  # the file itself
    assert (tokenizer.bos_id(), tokenizer.eos_id()) == (vocab["<s>"], vocab["</s>"]) == (1, 2)
    assert tokenizer.get_piece_size() == len(vocab) <= cfg.vocab_size
    ids = tokenizer.encode(texts[5])
    assert 1 not in ids and all(0 <= i < len(vocab) for i in ids)
    assert tokenizer.decode(ids) == texts[5] and tokenizer.decode([1, *ids, 2]) == texts[5]
    assert tokenizer.encode(texts[:2]) == [tokenizer.encode(texts[0]), tokenizer.encode(texts[1])]
    docs = encode_documents(tokenizer, texts[:1], cfg)
    assert list(docs[0]) == [1, *tokenizer.encode(texts[0]), 2]
    with pytest.raises(DataError, match=r"does not match the checkpoint: it has bos_token_id 1 \(the model has 5\)"):
        checkpoint_tokenizer(tmp_path, cfg.replace(bos_token_id=5))
    with pytest.raises(DataError, match=r"vocab_size \d+ \(the model has 100\)"):
        checkpoint_tokenizer(tmp_path, cfg.replace(vocab_size=100))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="is not a tokenizers tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="no tokenizer in .*tokenizer.model is missing"):
        load_tokenizer(tmp_path)
