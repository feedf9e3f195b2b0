"""The token cache (lite.data.cached_documents) against plain per-document tokenisation, and
train.py --tokenizer with a SentencePiece model and a Hugging Face tokenizer.json (tiny runs)."""

import json
import math
import pathlib
import subprocess
import sys
import threading
from collections import Counter

import numpy as np
import pytest
import sentencepiece as spm
from hf_tokenizer import write_hf_tokenizer

import lite.data
import train as train_module
from lite.config import get_config
from lite.data import (HFTokenizer, TokenizedDocuments, cached_documents, checkpoint_tokenizer,
                       load_tokenizer, train_tokenizer, training_batches, unigram_entropy)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXTS = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" + " again" * (i % 5) for i in range(60)]


def fresh_ids(tokenizer, texts, cfg) -> list[list[int]]:
    """[BOS] ids [EOS] per text, one text at a time: the reference the cache must reproduce."""
    return [[cfg.bos_token_id, *tokenizer.encode(text), cfg.eos_token_id] for text in texts]


def as_lists(docs: TokenizedDocuments) -> list[list[int]]:
    return [doc.tolist() for doc in docs]


def entry_files(cache_dir: pathlib.Path) -> dict[str, int]:
    """{entry/file: mtime_ns} of every file the token cache holds (lock files aside)."""
    return {str(p.relative_to(cache_dir)): p.stat().st_mtime_ns
            for p in sorted((cache_dir / "tokens").rglob("*")) if p.is_file() and p.suffix != ".lock"}


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return load_tokenizer(train_tokenizer(TEXTS, get_config("tiny"), tmp_path_factory.mktemp("sp")))


class CountingTokenizer(HFTokenizer):
    """An HF tokenizer that counts its encode calls (its cache key is the plain HFTokenizer's)."""

    def __init__(self, directory: pathlib.Path, fail_at_call: int | None = None):
        loaded = HFTokenizer.from_files(directory / "tokenizer.json")
        super().__init__(loaded._tokenizer, {})
        self.calls, self.fail_at_call = 0, fail_at_call
        self._lock = threading.Lock()

    def encode(self, text):
        with self._lock:
            self.calls += 1
            if self.calls == self.fail_at_call:
                raise KeyboardInterrupt("killed while tokenising")
        return super().encode(text)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    write_hf_tokenizer(directory, TEXTS, 300)
    return directory


def test_cache_is_written_once_then_memory_mapped_and_equals_a_fresh_tokenisation(sp, tmp_path, monkeypatch):
    cfg = get_config("tiny")
    docs = cached_documents(sp, TEXTS, cfg, tmp_path)
    assert as_lists(docs) == fresh_ids(sp, TEXTS, cfg)
    assert len(docs) == len(TEXTS) and docs[-1].tolist() == fresh_ids(sp, TEXTS[-1:], cfg)[0]
    with pytest.raises(IndexError):
        docs[len(TEXTS)]
    written = entry_files(tmp_path)
    assert sorted(pathlib.Path(name).name for name in written) == ["manifest.json", "offsets.npy", "tokens.npy"]

    monkeypatch.setattr(lite.data, "encode_documents", lambda *a: pytest.fail("the cached corpus was tokenised again"))
    again = cached_documents(sp, TEXTS, cfg, tmp_path)
    assert isinstance(again.tokens, np.memmap) and entry_files(tmp_path) == written
    assert as_lists(again) == fresh_ids(sp, TEXTS, cfg)
    counts = Counter(token for ids in fresh_ids(sp, TEXTS, cfg) for token in ids)
    total = sum(counts.values())
    want = -sum(n / total * math.log(n / total) for n in counts.values())
    assert unigram_entropy(again, cfg.vocab_size) == pytest.approx(want, rel=1e-12)


def test_another_corpus_tokenizer_or_special_id_gets_another_entry(sp, hf_dir, tmp_path):
    cfg = get_config("tiny")
    other_sp = load_tokenizer(train_tokenizer(TEXTS, cfg.replace(vocab_size=200), tmp_path / "sp200"))
    hf = HFTokenizer.from_files(hf_dir / "tokenizer.json")
    variants = [(sp, TEXTS, cfg), (sp, TEXTS[:-1] + [TEXTS[-1] + "!"], cfg), (sp, TEXTS[:-1], cfg),
                (sp, TEXTS[:30] + ["".join(TEXTS[30:32])] + TEXTS[32:], cfg),  # two texts joined: same characters
                (other_sp, TEXTS, cfg), (hf, TEXTS, cfg), (sp, TEXTS, cfg.replace(eos_token_id=3))]
    keys = []
    for tokenizer, texts, config in variants:
        docs = cached_documents(tokenizer, texts, config, tmp_path / "cache")
        assert as_lists(docs) == fresh_ids(tokenizer, texts, config)
        keys.append(docs.key)
    assert len(set(keys)) == len(variants)
    assert len(list((tmp_path / "cache" / "tokens").glob("*/manifest.json"))) == len(variants)
    # Loaded again from its file, the same tokenizer finds its entry.
    reloaded = HFTokenizer.from_files(hf_dir / "tokenizer.json")
    assert cached_documents(reloaded, TEXTS, cfg, tmp_path / "cache").key == keys[5]


@pytest.mark.parametrize("damage", ["truncate tokens", "flip a token", "truncate offsets", "drop the manifest"])
def test_a_damaged_cache_is_detected_and_rebuilt(sp, tmp_path, damage):
    cfg = get_config("tiny")
    entry = pathlib.Path(cached_documents(sp, TEXTS, cfg, tmp_path).tokens.filename).parent
    name = {"truncate tokens": "tokens.npy", "flip a token": "tokens.npy", "truncate offsets": "offsets.npy",
            "drop the manifest": "manifest.json"}[damage]
    content = (entry / name).read_bytes()
    if damage == "drop the manifest":
        (entry / name).unlink()
    elif damage == "flip a token":  # same size: only the sha256 tells
        (entry / name).write_bytes(content[:-4] + bytes(b ^ 1 for b in content[-4:]))
    else:
        (entry / name).write_bytes(content[: len(content) // 2])
    with pytest.warns(UserWarning, match=f"token cache {entry}.* tokenising the corpus again"):
        docs = cached_documents(sp, TEXTS, cfg, tmp_path)
    assert as_lists(docs) == fresh_ids(sp, TEXTS, cfg)
    assert (entry / name).read_bytes() == content
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name, f"{entry.name}.lock"]  # nothing left over


def test_a_killed_build_leaves_no_entry_and_the_next_start_builds_it(hf_dir, tmp_path, monkeypatch):
    cfg = get_config("tiny")
    monkeypatch.setattr(lite.data, "ENCODE_BLOCK", 7)  # several blocks: killed after the first is written
    with pytest.raises(KeyboardInterrupt):
        cached_documents(CountingTokenizer(hf_dir, fail_at_call=2), TEXTS, cfg, tmp_path)
    assert [p.name for p in (tmp_path / "tokens").iterdir() if not p.name.endswith(".lock")] == []
    tokenizer = CountingTokenizer(hf_dir)
    docs = cached_documents(tokenizer, TEXTS, cfg, tmp_path)
    assert tokenizer.calls == math.ceil(len(TEXTS) / 7)
    assert as_lists(docs) == fresh_ids(HFTokenizer.from_files(hf_dir / "tokenizer.json"), TEXTS, cfg)


def test_processes_sharing_the_cache_tokenise_once(hf_dir, tmp_path):
    """Two concurrent starts on one cache directory (threads: the lock is a per-open-file flock, as
    between processes): one tokenises, the other waits and opens the same entry."""
    cfg = get_config("tiny")
    tokenizers = [CountingTokenizer(hf_dir), CountingTokenizer(hf_dir)]
    results = [None, None]

    def start(i):
        results[i] = cached_documents(tokenizers[i], TEXTS, cfg, tmp_path)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(t.calls for t in tokenizers) == [0, 1]
    assert as_lists(results[0]) == as_lists(results[1]) == fresh_ids(tokenizers[0], TEXTS, cfg)


def test_batches_from_the_cache_equal_batches_from_lists_and_resume_exactly(sp, tmp_path):
    """The grain pipeline over the memory-mapped cache yields the batches and iterator states of the
    in-memory documents, so checkpointed iterator states stay valid."""
    cfg = get_config("tiny")
    listed = [np.asarray(ids, np.int32) for ids in fresh_ids(sp, TEXTS, cfg)]
    cached = cached_documents(sp, TEXTS, cfg, tmp_path)
    for process in range(2):
        a = iter(training_batches(listed, 16, 2, seed=3, process_index=process, process_count=2))
        b = iter(training_batches(cached, 16, 2, seed=3, process_index=process, process_count=2))
        for _ in range(25):  # past an epoch of this process's share
            x, y = next(a), next(b)
            assert all(np.array_equal(x[k], y[k]) for k in ("tokens", "segment_ids"))
        assert a.get_state() == b.get_state()
        state = b.get_state()
        want = [next(b) for _ in range(5)]
        resumed = iter(training_batches(cached_documents(sp, TEXTS, cfg, tmp_path), 16, 2, seed=3,
                                        process_index=process, process_count=2))
        resumed.set_state(state)
        got = [next(resumed) for _ in range(5)]
        assert all(np.array_equal(w["tokens"], g["tokens"]) for w, g in zip(want, got))


# ---------------------------------------------------------------------------------------------
# train.py --tokenizer.

RUN = ["--preset", "tiny", "--set", "steps=2", "--set", "batch_size=4", "--set", "seq_len=32",
       "--set", "eval_every=2", "--set", "checkpoint_every=2", "--set", "sample_tokens=0"]


def train(workspace, run_dir, *extra):
    command = [sys.executable, str(ROOT / "train.py"), *RUN, "--data", str(workspace / "corpus.txt"),
               "--cache-dir", str(workspace / "token-cache-runs"), "--run-dir", str(run_dir), *extra]
    result = subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def sentencepiece_file(workspace):
    """A SentencePiece BPE model trained here with sentencepiece itself (BOS 1, EOS 2; fewer than 200 pieces)."""
    texts = (workspace / "corpus.txt").read_text().split("\n\n")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(workspace / "brought"),
                                   vocab_size=200, model_type="bpe", unk_id=0, bos_id=1, eos_id=2,
                                   hard_vocab_limit=False, minloglevel=2)
    return workspace / "brought.model"


def test_train_with_a_sentencepiece_file_then_resume_without_it(workspace, sentencepiece_file, tmp_path, capsys):
    """vocab_size=300 (more than the tokenizer's pieces, as a padded embedding) keeps the compiled
    steps the same as the tokenizer.json run's below, which then come from the compile cache."""
    pieces = spm.SentencePieceProcessor(model_file=str(sentencepiece_file)).get_piece_size()
    source = tmp_path / "mine.model"
    source.write_bytes(sentencepiece_file.read_bytes())
    run_dir = tmp_path / "run"
    code, output = train(workspace, run_dir, "--tokenizer", str(source), "--set", "vocab_size=300")
    assert code == 0, output
    assert f"tokenizer {pieces} pieces" in output
    run = json.loads((run_dir / "run_config.json").read_text())
    assert run["tokenizer"] == str(source.resolve()) and run["model"]["vocab_size"] == 300
    for copy in (run_dir / "tokenizer.model", run_dir / "model" / "tokenizer.model"):
        assert copy.read_bytes() == source.read_bytes()
    assert not (run_dir / "tokenizer.json").exists()
    cache = workspace / "token-cache-runs"
    written = entry_files(cache)
    entries = {pathlib.Path(name).parent.name for name in written}
    assert len(entries) == 2  # training and validation documents

    source.unlink()  # the run keeps its own copy
    code, output = train(workspace, run_dir)  # resumes the finished run: data, iterator state, final validation
    assert code == 0, output
    assert "resumed" in output and f"tokenizer {pieces} pieces" in output
    assert entry_files(cache) == written  # the same entries, not written again

    refused = [*RUN, "--data", str(workspace / "corpus.txt"), "--cache-dir", str(cache), "--run-dir", str(run_dir),
               "--tokenizer", str(sentencepiece_file)]
    assert train_module.main(refused) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer (run: {source.resolve()})" in err and err.count("\n") == 1, err


def test_train_with_a_tokenizer_json_takes_its_vocabulary_and_serves_from_its_copy(workspace, tmp_path):
    texts = (workspace / "corpus.txt").read_text().split("\n\n")
    write_hf_tokenizer(tmp_path / "hf", texts, 300)
    vocab = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 300
    run_dir = tmp_path / "run"
    code, output = train(workspace, run_dir, "--tokenizer", str(tmp_path / "hf" / "tokenizer.json"))
    assert code == 0, output
    run = json.loads((run_dir / "run_config.json").read_text())
    assert (run["model"]["vocab_size"], run["model"]["bos_token_id"], run["model"]["eos_token_id"]) == (
        len(vocab), vocab["<s>"], vocab["</s>"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (run_dir / "model" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    assert not (run_dir / "model" / "tokenizer.model").exists()
    cfg = get_config("tiny", vocab_size=300)
    served = checkpoint_tokenizer(run_dir / "model", cfg)
    original = HFTokenizer.from_files(tmp_path / "hf" / "tokenizer.json")
    assert served.encode(texts[:5]) == original.encode(texts[:5])


@pytest.fixture
def unconfigured_hf(tmp_path):
    write_hf_tokenizer(tmp_path / "bare", TEXTS, 300, config=False)
    return tmp_path / "bare" / "tokenizer.json"


def test_bad_tokenizer_arguments_are_one_line_errors(workspace, sentencepiece_file, unconfigured_hf, tmp_path,
                                                    capsys):
    pieces = spm.SentencePieceProcessor(model_file=str(sentencepiece_file)).get_piece_size()
    assert pieces > 100
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    for extra, message in (
            (["--tokenizer", str(tmp_path / "missing.model")], "missing.model does not exist"),
            (["--tokenizer", str(garbage)], "garbage.model is not a SentencePiece model"),
            (["--tokenizer", str(unconfigured_hf)], "defines no BOS and no EOS token"),
            (["--tokenizer", str(sentencepiece_file), "--set", "vocab_size=100"],
             "does not fit the --set model settings (leave vocab_size, bos_token_id and eos_token_id unset to take "
             f"the tokenizer's): it has vocab_size {pieces} (the model has 100)"),
            (["--tokenizer", str(sentencepiece_file), "--set", "bos_token_id=5"], "bos_token_id 1 (the model has 5)"),
            (["--tokenizer", str(sentencepiece_file), "--init-from", str(tmp_path)], "both name the tokenizer")):
        args = [*RUN, "--data", str(workspace / "corpus.txt"), "--cache-dir", str(tmp_path / "cache"),
                "--run-dir", str(tmp_path / "run"), *extra]
        assert train_module.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "run").exists()
