"""serve.py end to end on a tiny checkpoint with a real SentencePiece tokenizer, and its errors."""

import importlib.util
import io
import json
import pathlib
import shutil

import pytest
import sentencepiece as spm
from flax import nnx

import serve
from lite import convert
from lite.checkpoint import WEIGHTS_FILE, save_model
from lite.config import get_config
from lite.model import LongcatModel

CFG = get_config("tiny", initializer_range=0.1)
PIECES = 400  # tokenizer pieces < CFG.vocab_size = 512


def kjv_verses(count: int) -> list[str]:
    # find_spec, not `import bible`: the package's __init__ needs pkg_resources, which new setuptools lack.
    path = pathlib.Path(importlib.util.find_spec("bible").origin).parent / "data" / "kjv.jsonl"
    with path.open() as lines:
        return [json.loads(next(lines))["text"] for _ in range(count)]


def train_tokenizer(path: pathlib.Path, vocab_size: int) -> spm.SentencePieceProcessor:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(kjv_verses(1500)), model_prefix=str(path.with_suffix("")),
                                   vocab_size=vocab_size, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A train.py-style run directory: RUN_DIR/model holds config, weights and tokenizer.model. The
    tokenizer has fewer pieces than the model's vocabulary, as train.py's may (hard_vocab_limit=False)."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = root / "tok.model"
    train_tokenizer(tokenizer, PIECES)
    save_model(LongcatModel(CFG, rngs=nnx.Rngs(0)), root / "run" / "model",
               extra_files={"tokenizer.model": str(tokenizer)})
    return root / "run"


def run(argv, stdin=""):
    out = io.StringIO()
    serve.serve(serve.parse_args(argv), io.StringIO(stdin), out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_generates_one_line_per_prompt_and_a_summary(run_dir):
    tokenizer = spm.SentencePieceProcessor(model_file=str(run_dir / "model" / "tokenizer.model"))
    prompts = ["In the beginning God created", "And the earth was without form"]
    lines = run(["--checkpoint", str(run_dir), "--max-new-tokens", "12", *prompts])
    assert len(lines) == 3
    for prompt, line in zip(prompts, lines):
        assert line["prompt"] == prompt
        assert line["num_tokens"] == len(line["token_ids"]) > 0
        assert all(0 <= t < PIECES and t != CFG.eos_token_id for t in line["token_ids"])  # never undecodable
        assert line["completion"] == tokenizer.decode(line["token_ids"])
        assert line["stop_reason"] in ("eos", "max_new_tokens")
        assert line["stop_reason"] == "eos" or line["num_tokens"] == 12
    summary = lines[2]["summary"]
    assert summary["prompts"] == 2
    assert summary["prefill_tokens"] == sum(1 + len(tokenizer.encode(p)) for p in prompts)  # [BOS] + text
    assert summary["prefill_tokens_per_s"] > 0 and summary["decode_tokens_per_s"] > 0

    # The same prompts from stdin, with a stop string taken from the first completion.
    text = lines[0]["completion"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    again = run(["--checkpoint", str(run_dir / "model"), "--max-new-tokens", "12", "--stop", stop],
                stdin="\n".join(prompts) + "\n")
    assert again[0]["stop_reason"] == "stop_string"
    assert again[0]["completion"] == text[: text.index(stop)]
    assert again[0]["token_ids"] == lines[0]["token_ids"][: len(again[0]["token_ids"])]
    assert stop in tokenizer.decode(again[0]["token_ids"])
    assert stop not in tokenizer.decode(again[0]["token_ids"][:-1])


def test_prompt_sources(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("first prompt\nsecond prompt\n")
    read = lambda argv, stdin="": serve.read_prompts(serve.parse_args(["--checkpoint", "x", *argv]),  # noqa: E731
                                                     io.StringIO(stdin))
    assert read(["--prompts", str(file)]) == ["first prompt", "second prompt"]
    assert read(["a", "b c"]) == ["a", "b c"]
    assert read([], stdin="from stdin\nsecond\n") == ["from stdin", "second"]
    file.write_text("first\n\nthird\n")
    with pytest.raises(serve.ServeError, match=r"prompt 1 \(line 2 of .*prompts.txt\) is empty"):
        read(["--prompts", str(file)])
    with pytest.raises(serve.ServeError, match="either as arguments or with --prompts FILE"):
        read(["a", "--prompts", str(file)])
    with pytest.raises(serve.ServeError, match="no prompts given"):
        read([], stdin="")


def broken_checkpoint(run_dir, tmp_path, how):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "model", broken)
    if how == "weights":
        data = (broken / WEIGHTS_FILE).read_bytes()
        (broken / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    elif how == "config":
        (broken / "config.json").write_text('{"vocab_size": 512, ')
    elif how == "no tokenizer":
        (broken / "tokenizer.model").unlink()
    elif how == "bad tokenizer":
        (broken / "tokenizer.model").write_bytes(b"not a model")
    elif how == "other tokenizer":
        train_tokenizer(tmp_path / "large.model", 600)
        shutil.copyfile(tmp_path / "large.model", broken / "tokenizer.model")
    return broken


@pytest.mark.parametrize("how,message", [
    ("missing", "no checkpoint at .*config.json is missing"),
    ("weights", "model.safetensors is corrupt or unreadable"),
    ("config", "is not a valid model config"),
    ("no tokenizer", "no tokenizer in .*tokenizer.model is missing"),
    ("bad tokenizer", "is not a SentencePiece model"),
    ("other tokenizer", r"does not match the checkpoint: it has vocab_size 600 \(the model has 512\)"),
])
def test_bad_checkpoints(run_dir, tmp_path, capsys, how, message):
    path = tmp_path / "nowhere" if how == "missing" else broken_checkpoint(run_dir, tmp_path, how)
    with pytest.raises(SystemExit, match=message):
        serve.main(["--checkpoint", str(path), "hello"])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "-1", "hello"], "temperature must be >= 0"),
    (["--top-p", "0", "hello"], r"top_p must lie in \(0, 1\]"),
    (["--top-p", "1.5", "hello"], r"top_p must lie in \(0, 1\]"),
    (["--top-k", "-2", "hello"], "top_k must be an integer >= 0"),
    (["--max-new-tokens", "0", "hello"], "--max-new-tokens must be >= 1"),
    (["hello", ""], r"prompt 1 \(argument 2\) is empty"),
    (["In the beginning " * 1500], r"prompt 0 is \d+ tokens long; the context window is 4096 tokens"),
])
def test_bad_requests(run_dir, capsys, argv, message):
    with pytest.raises(SystemExit, match=message):
        serve.main(["--checkpoint", str(run_dir), *argv])
    assert capsys.readouterr().out == ""


def test_empty_stdin(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(SystemExit, match="no prompts given"):
        serve.main(["--checkpoint", str(run_dir)])
    assert capsys.readouterr().out == ""


def test_mesh_decoding_equals_one_device(run_dir):
    """--mesh expert=4 (experts and N-gram rows split over 4 fake CPU devices) decodes the same tokens."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4")
    prompts = ["In the beginning God created", "And the earth"]

    def serve_lines(*extra):
        done = subprocess.run([sys.executable, "serve.py", "--checkpoint", str(run_dir), "--max-new-tokens", "8",
                               *extra, *prompts], cwd=pathlib.Path(serve.__file__).parent, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    alone, sharded = serve_lines(), serve_lines("--mesh", "expert=4")
    assert [line["token_ids"] for line in sharded[:2]] == [line["token_ids"] for line in alone[:2]]
    assert all(line["num_tokens"] > 0 for line in sharded[:2])
    # A Hugging Face directory, read straight into its shards (no converted copy).
    hf_dir = run_dir.parent / "hf-mesh"
    convert.to_hf(run_dir / "model", hf_dir)
    from_hf = serve_lines("--mesh", "expert=4", "--checkpoint", str(hf_dir))
    assert [line["token_ids"] for line in from_hf[:2]] == [line["token_ids"] for line in alone[:2]]


def test_hf_checkpoint_with_tokenizer_json_serves(run_dir, tmp_path):
    """An HF checkpoint (torch layout, tokenizer.json + tokenizer_config.json, no tokenizer.model)
    decodes the same tokens as our directory of the same weights; text comes from the tokenizers package."""
    import tokenizers
    from hf_tokenizer import write_hf_tokenizer

    hf_dir, ours = tmp_path / "hf", tmp_path / "ours"
    convert.to_hf(run_dir / "model", hf_dir)
    for directory in (hf_dir, ours):
        (directory / "tokenizer.model").unlink(missing_ok=True)
        (directory / "tokenizer_config.json").unlink(missing_ok=True)
    shutil.copytree(run_dir / "model", ours, dirs_exist_ok=True)
    (ours / "tokenizer.model").unlink()
    for directory in (hf_dir, ours):
        write_hf_tokenizer(directory, kjv_verses(300), PIECES)
    prompts = ["In the beginning God created", "And the earth"]
    got = run(["--checkpoint", str(hf_dir), "--max-new-tokens", "6", *prompts])
    want = run(["--checkpoint", str(ours), "--max-new-tokens", "6", *prompts])
    assert [line["token_ids"] for line in got[:2]] == [line["token_ids"] for line in want[:2]]
    reference = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for prompt, line in zip(prompts, got):
        assert line["completion"] == reference.decode(line["token_ids"], skip_special_tokens=True)
    assert got[-1]["summary"]["prefill_tokens"] == sum(
        1 + len(reference.encode(p, add_special_tokens=False).ids) for p in prompts)  # one [BOS], added by id


def test_bad_mesh_is_one_clear_error(run_dir, capsys):
    with pytest.raises(SystemExit, match=r"mesh \{'data': 3\} needs 3 devices, but 1 are available"):
        serve.main(["--checkpoint", str(run_dir), "--mesh", "data=3", "hello"])
    assert capsys.readouterr().out == ""
