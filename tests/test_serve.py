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
from hf_tokenizer import write_hf_tokenizer
from lite import convert
from lite.checkpoint import WEIGHTS_FILE, load_model, save_model
from lite.config import get_config
from lite.data import load_tokenizer
from lite.decode import Generator, completion_text
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
        # The completion continues the prompt's text: its first token's leading space is kept.
        assert prompt + line["completion"] == tokenizer.decode(tokenizer.encode(prompt) + line["token_ids"])
        assert line["prompt_tokens"] == 1 + len(tokenizer.encode(prompt))
        assert line["stop_reason"] in ("eos", "max_new_tokens")
        assert line["stop_reason"] == "eos" or line["num_tokens"] == 12
        assert line["finish_reason"] == {"eos": "stop", "max_new_tokens": "length"}[line["stop_reason"]]
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
    assert again[0]["finish_reason"] == "stop"
    context = tokenizer.encode(prompts[0])
    text_of = lambda ids: tokenizer.decode(context + ids)[len(prompts[0]):]  # noqa: E731
    assert stop in text_of(again[0]["token_ids"])
    assert stop not in text_of(again[0]["token_ids"][:-1])


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
        prompt_ids = reference.encode(prompt, add_special_tokens=False).ids
        assert prompt + line["completion"] == reference.decode(prompt_ids + line["token_ids"])
    assert got[-1]["summary"]["prefill_tokens"] == sum(
        1 + len(reference.encode(p, add_special_tokens=False).ids) for p in prompts)  # one [BOS], added by id


def test_bad_mesh_is_one_clear_error(run_dir, capsys):
    with pytest.raises(SystemExit, match=r"mesh \{'data': 3\} needs 3 devices, but 1 are available"):
        serve.main(["--checkpoint", str(run_dir), "--mesh", "data=3", "hello"])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("kind", ["sentencepiece", "hf metaspace", "hf byte-level"])
def test_completion_text_continues_the_prompt(run_dir, tmp_path, kind):
    """prompt text + completion text = the text of all the ids, wherever the prompt ends; decoding the
    new ids alone drops the first one's leading space with SentencePiece-style pieces."""
    if kind == "sentencepiece":
        tokenizer = load_tokenizer(run_dir / "model" / "tokenizer.model")
    else:
        write_hf_tokenizer(tmp_path, kjv_verses(300), PIECES, metaspace=kind == "hf metaspace")
        tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    spaces_dropped = 0
    for verse in kjv_verses(30)[20:]:
        ids = tokenizer.encode(verse)
        for cut in (1, len(ids) // 2, len(ids) - 1):
            text = completion_text(tokenizer.decode, [CFG.bos_token_id, *ids[:cut]], ids[cut:])
            assert tokenizer.decode(ids[:cut]) + text == tokenizer.decode(ids)
            spaces_dropped += tokenizer.decode(ids[cut:]) != text
    assert spaces_dropped > 0 if kind != "hf byte-level" else spaces_dropped == 0


def write_requests(path: pathlib.Path, requests: list) -> pathlib.Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests))
    return path


def test_jsonl_requests_round_trip_in_bounded_streamed_batches(run_dir, tmp_path, capsys, monkeypatch):
    """Five requests (and a blank line) in batches of 2, 2 and 1: one result per request, in input
    order, with its id; each batch's rows are in the file before the next batch starts; the summary
    goes to stderr. Greedy rows equal the library's greedy decoding of their prompts, cut at each
    request's max_new_tokens or stop string; the same sampled request with the same seed gives the
    same tokens in two different batches."""
    tokenizer = load_tokenizer(run_dir / "model" / "tokenizer.model")
    prompts = ["And the earth was", "And God said, Let there be", "And God saw the light"]
    encoded = [tokenizer.encode(p) for p in prompts]
    generator = Generator(load_model(run_dir / "model"), vocab_limit=PIECES)
    greedy, _ = generator.generate([[CFG.bos_token_id, *ids] for ids in encoded], 5, detokenize=tokenizer.decode)
    text = greedy[1].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text

    sampled = dict(prompt="In the beginning God created", temperature=1.0, top_k=40, seed=5, max_new_tokens=5)
    requests = [dict(id="a", **sampled), dict(id=7, prompt=prompts[0], max_new_tokens=3),
                dict(id="c", prompt=prompts[1], max_new_tokens=5, stop=stop), dict(id="d", **sampled), "",
                dict(id="1", prompt=prompts[2], stop=["\u00a7", "STOP"])]
    path = write_requests(tmp_path / "requests.jsonl", requests)
    output = tmp_path / "results.jsonl"
    batch_sizes, original = [], serve.generate

    def generate_after_checking_the_file(generator, batch, tok):
        written = output.read_text().splitlines() if output.exists() else []
        assert len(written) == sum(batch_sizes)  # every finished batch is already in the file
        batch_sizes.append(len(batch))
        return original(generator, batch, tok)

    monkeypatch.setattr(serve, "generate", generate_after_checking_the_file)
    serve.main(["--checkpoint", str(run_dir), "--input", str(path), "--output", str(output), "--batch-size", "2",
                "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert batch_sizes == [2, 2, 1]
    assert [row["id"] for row in rows] == ["a", 7, "c", "d", "1"]
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["summary"]
    assert summary["prompts"] == 5 and summary["decode_tokens"] > 0
    assert "summary" not in output.read_text()

    by_id = {row["id"]: row for row in rows}
    for request_id, ids, want, max_new in ((7, encoded[0], greedy[0], 3), ("1", encoded[2], greedy[2], 4)):
        row = by_id[request_id]
        assert row["token_ids"] == want.token_ids[:max_new], request_id
        assert row["finish_reason"] == ("length" if len(want.token_ids) >= max_new else "stop")
        assert row["num_tokens"] == len(row["token_ids"]) and row["prompt_tokens"] == 1 + len(ids)
        assert prompts[encoded.index(ids)] + row["completion"] == tokenizer.decode(ids + row["token_ids"])
    row = by_id["c"]
    assert (row["completion"], row["finish_reason"], row["stop_reason"]) == (text[: text.index(stop)], "stop",
                                                                             "stop_string")
    assert row["token_ids"] == greedy[1].token_ids[: row["num_tokens"]]
    assert by_id["a"]["token_ids"] == by_id["d"]["token_ids"] and by_id["a"]["completion"] == by_id["d"]["completion"]


GOOD = {"id": "x", "prompt": "In the beginning"}


@pytest.mark.parametrize("lines,message", [
    (['{"id": "x", "prompt": "hi"', ], r"line 1 of .*requests.jsonl is not valid JSON: Expecting ',' delimiter"),
    ([GOOD, "[1, 2]"], r"line 2 of .*: a request is a JSON object, got list"),
    ([{"id": "x"}], r"line 1 of .*: the request has no 'prompt'"),
    ([{"prompt": "hi"}], r"line 1 of .*: the request has no 'id'"),
    ([{"id": 1.5, "prompt": "hi"}], "id must be a string or an integer, got 1.5"),
    ([{"id": "x", "prompt": "  "}], "prompt must be a non-empty string"),
    ([{"id": "x", "prompt": "hi", "max_tokens": 5}], r"unknown field\(s\) \['max_tokens'\] \('max_tokens': did you "
                                                     r"mean 'max_new_tokens'\?\)"),
    ([{**GOOD, "max_new_tokens": 0}], "max_new_tokens must be an integer >= 1, got 0"),
    ([{**GOOD, "max_new_tokens": True}], "max_new_tokens must be an integer >= 1, got True"),
    ([{**GOOD, "temperature": -1}], r"line 1 of .*: temperature must be >= 0"),
    ([{**GOOD, "top_p": 0}], r"top_p must lie in \(0, 1\]"),
    ([{**GOOD, "top_k": 2.5}], "top_k must be an integer >= 0"),
    ([{**GOOD, "stop": ["", "x"]}], "stop must be a non-empty string or a list of them"),
    ([{**GOOD, "stop": 3}], "stop must be a non-empty string or a list of them, got 3"),
    ([{**GOOD, "seed": -1}], r"seed must be an integer in \[0, 2\^63\), got -1"),
    ([GOOD, "", {**GOOD, "prompt": "other"}], r"line 3 of .*: id 'x' is already the id of line 1"),
    ([{"id": "x", "prompt": "In the beginning " * 1500}],
     r"line 1 of .*: the prompt is \d+ tokens long; the context window is 4096 tokens"),
    (["", " "], r"no requests in .*requests.jsonl: every line is blank"),
])
def test_bad_request_lines_are_one_clear_error(run_dir, tmp_path, capsys, lines, message):
    path = write_requests(tmp_path / "requests.jsonl", lines)
    with pytest.raises(SystemExit, match=message):
        serve.main(["--checkpoint", str(run_dir), "--input", str(path), "--output", str(tmp_path / "out.jsonl")])
    assert capsys.readouterr().out == "" and not (tmp_path / "out.jsonl").exists()


def test_bad_jsonl_arguments(run_dir, tmp_path, capsys):
    path = write_requests(tmp_path / "requests.jsonl", [GOOD])
    (tmp_path / "bad.jsonl").write_bytes(b'{"id": "x", "prompt": "hi"}\n{"id": "y", "prompt": "\xc3\x28"}\n')
    checkpoint = ["--checkpoint", str(run_dir)]
    for argv, message in [
        (["--input", str(path), "hello"], "give either --input FILE .* or prompts, not both"),
        (["--output", str(tmp_path / "out.jsonl"), "hello"], "--output goes with --input FILE"),
        (["--input", str(tmp_path / "missing.jsonl")], "input file .*missing.jsonl does not exist"),
        (["--input", str(path), "--output", str(path)], "--output .*requests.jsonl is the input file"),
        (["--input", str(path), "--output", str(tmp_path / "no" / "out.jsonl")], "directory .*no does not exist"),
        (["--input", str(path), "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--input", str(tmp_path / "bad.jsonl")], r"line 2 of .*bad.jsonl is not UTF-8 text: byte 23"),
    ]:
        with pytest.raises(SystemExit, match=message):
            serve.main([*checkpoint, *argv])
        assert capsys.readouterr().out == ""
    assert path.read_text() == json.dumps(GOOD) + "\n"
