"""Faults and bad input a careless user can produce, driven through the real commands (train.py,
serve.py, python -m lite.convert as subprocesses): each case asserts the exit status, one message
line on stderr (never a traceback), and that nothing that existed before was changed or lost.

One tiny run (3 steps, a checkpoint per step) is trained once per module and copied per case. The
cases that fail (or finish) without training (FAST_CASES) call the commands' main() in this process,
with stdin, stdout and stderr redirected, so that 40 of them do not pay 40 JAX starts; one of each
command (`real_process=True`) runs as a real subprocess beside them, for the path main() cannot show
(the interpreter's own exit, stdin bytes). The cases that train run one by one, as subprocesses.
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Callable

import numpy as np
import pytest

import serve
import train
from lite import checkpoint, convert
from lite.config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
# JAX_PLATFORMS=cpu: where a CUDA plugin is installed without a GPU, jax would log its failed start.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
# Log lines of the native libraries (absl / glog) that any jax process may print first.
NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWEF]\d{4} \d\d:\d\d:\d\d)")

RUN = ["--preset", "tiny", "--set", "steps=3", "--set", "log_every=1", "--set", "eval_every=100",
       "--set", "checkpoint_every=1", "--set", "keep_checkpoints=3", "--set", "batch_size=4", "--set", "seq_len=32",
       "--set", "sample_tokens=0", "--set", "max_position_embeddings=64"]


@dataclasses.dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        """stderr without the native libraries' log lines."""
        return [line for line in self.stderr.splitlines() if line.strip() and not NOISE.match(line)]

    def one_line(self, pattern: str) -> str:
        lines = self.lines()
        assert "Traceback" not in self.stderr, self.stderr
        assert len(lines) == 1, f"expected one message line, got:\n{self.stderr}"
        assert re.search(pattern, lines[0]), lines[0]
        return lines[0]


def command(kind: str, *args: str) -> list[str]:
    program = {"train": [str(ROOT / "train.py")], "serve": [str(ROOT / "serve.py")],
               "convert": ["-m", "lite.convert"]}[kind]
    return [sys.executable, *program, *args]


def execute(argv: list[str], cwd: pathlib.Path, stdin: bytes = b"", timeout: float = 300) -> Result:
    done = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, timeout=timeout, env=ENV)
    return Result(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))


MAINS = {"train": train.main, "serve": serve.main, "convert": convert.main}


def execute_in_process(kind: str, argv: list[str], stdin: bytes = b"") -> Result:
    """`kind`'s main(argv) as the interpreter would end it: a returned status, SystemExit (a message
    is printed to stderr with status 1), or an uncaught exception (its traceback, status 1)."""
    out, err = io.StringIO(), io.StringIO()
    real_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = MAINS[kind](argv) or 0
            except SystemExit as exit:
                code = exit.code
                if not isinstance(code, int | None):  # sys.exit("message")
                    print(code, file=sys.stderr)
                    code = 1
            except Exception:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc()
                code = 1
    finally:
        sys.stdin = real_stdin
    return Result(code or 0, out.getvalue(), err.getvalue())


def snapshot(root: pathlib.Path) -> dict[str, str]:
    """Every file (content hash) and folder under root; the lock file's pid aside."""
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if p.name != train.LOCK_FILE}


def finite_json(text: str) -> list:
    def refuse(constant):
        raise ValueError(f"bare {constant} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


# ---------------------------------------------------------------------------------------------
# The shared run.

def train_args(workspace: pathlib.Path, run_dir: pathlib.Path, *extra: str) -> list[str]:
    return command("train", *RUN, "--data", str(workspace / "corpus.txt"), "--cache-dir", str(workspace / "cache"),
                   "--run-dir", str(run_dir), *extra)


@pytest.fixture(scope="module")
def trained(workspace):
    run_dir = workspace / "trained"
    result = execute(train_args(workspace, run_dir), workspace)
    assert result.code == 0, result.stderr
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [1, 2, 3]
    return run_dir


def copy_run(trained: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(trained, target, symlinks=True)
    return target


def biggest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# ---------------------------------------------------------------------------------------------
# Cases that fail (or finish) without training: prepared, then run concurrently.

@dataclasses.dataclass
class Case:
    name: str
    kind: str  # train / serve / convert
    prepare: Callable  # (case dir, workspace, trained run) -> (argv after the program, stdin bytes)
    code: int  # expected exit status
    message: str | None  # regex of the one stderr line; None: exit 0 and stderr free of errors
    kept: str = "."  # the path (relative to the case dir) that must be exactly as before
    check: Callable | None = None  # (case dir, Result) -> None: further assertions
    real_process: bool = False  # run the real command as a subprocess, not its main() in this process


def serve_case(name: str, args: list[str], message: str, stdin: bytes = b"", edit: Callable | None = None,
               code: int = 1, real_process: bool = False) -> Case:
    """serve.py on a copy of the trained run's model/ (after `edit(model_dir)`)."""
    def prepare(case, workspace, trained):
        model = case / "model"
        shutil.copytree(trained / "model", model)
        if edit:
            edit(model)
        return ["--checkpoint", str(model), *args], stdin

    return Case(name, "serve", prepare, code, message, real_process=real_process)


def edit_config(**change) -> Callable:
    def edit(model):
        config = json.loads((model / "config.json").read_text())
        for key, value in change.items():
            if value is DELETE:
                del config[key]
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))
    return edit


def write(name: str, content: bytes) -> Callable:
    def edit(directory):
        (directory / name).write_bytes(content)
    return edit


DELETE = object()


def train_case(name: str, args: list[str], message: str, edit: Callable | None = None, fresh: bool = False,
               code: int = 2, real_process: bool = False) -> Case:
    """train.py on a copy of the trained run (or on a fresh run directory), with the run's own settings."""
    def prepare(case, workspace, trained):
        run_dir = case / "run"
        if not fresh:
            copy_run(trained, run_dir)
        if edit:
            edit(run_dir, case)
        argv = train_args(workspace, run_dir, *args)
        if (case / "corpus.txt").exists():  # the run was started on this case's own corpus
            argv = [str(case / "corpus.txt") if a == str(workspace / "corpus.txt") else a for a in argv]
        return argv[argv.index(str(ROOT / "train.py")) + 1:], b""

    return Case(name, "train", prepare, code, message, real_process=real_process)


def changed_corpus(run_dir, case):
    """The run's corpus, copied to a path of this case and then edited under the same path."""
    corpus = case / "corpus.txt"
    original = pathlib.Path(json.loads((run_dir / "run_config.json").read_text())["data"][0])
    config = json.loads((run_dir / "run_config.json").read_text())
    config["data"] = [str(corpus)]
    (run_dir / "run_config.json").write_text(json.dumps(config))
    corpus.write_text(original.read_text().replace("moses", "aaron"))


def damage_all_checkpoints(run_dir, case):
    for step_dir in (run_dir / "checkpoints").iterdir():
        data = biggest_file(step_dir / "state")
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def hf_out(case, workspace, trained):
    return ["--to-hf", str(case / "ours"), "--out", str(case / "out")]


def convert_case(name: str, prepare_out: Callable, message: str | None, to_hf: bool = True, kept: str = ".",
                 check: Callable | None = None, real_process: bool = False) -> Case:
    """lite.convert between the HF fixture (case/hf) and our format (case/ours), --out set by `prepare_out`."""
    def prepare(case, workspace, trained):
        shutil.copytree(FIXTURES / "plain", case / "hf")
        (case / "hf" / "expected.npz").unlink()
        shutil.copytree(trained / "model", case / "ours")
        out = prepare_out(case)
        return [*(["--to-hf", str(case / "ours")] if to_hf else ["--from-hf", str(case / "hf")]),
                "--out", str(out), "--quiet"], b""

    return Case(name, "convert", prepare, 0 if message is None else 1, message, kept, check, real_process)


def unrelated_files(case):
    (case / "out" / "results").mkdir(parents=True)
    (case / "out" / "notes.txt").write_text("mine")
    (case / "out" / "results" / "table.csv").write_text("1,2")
    return case / "out"


def previous_output(case):  # an earlier --to-hf output: the same kind, replaced
    shutil.copytree(case / "hf", case / "out")
    (case / "out" / "model.safetensors").write_bytes(b"stale")
    return case / "out"


def replaced_output(case, result):
    assert (case / "out" / "model.safetensors").stat().st_size > 100
    assert json.loads((case / "out" / "config.json").read_text())["model_type"] == "longcat_flash_ngram"


def mkdir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(parents=True)
    return path


def tokens_capped(case, result):
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    prompt_tokens = lines[-1]["summary"]["prefill_tokens"]
    assert lines[0]["num_tokens"] <= 64 - prompt_tokens  # the context window of the trained run


FAST_CASES = [
    # train.py: bad settings and values that make garbage.
    train_case("train learning_rate=inf", ["--set", "learning_rate=inf"], "learning_rate must be a finite number",
               fresh=True, real_process=True),
    train_case("train weight_decay=inf", ["--set", "weight_decay=inf"], "weight_decay must be a finite number",
               fresh=True),
    train_case("train rms_norm_eps=0", ["--set", "rms_norm_eps=0"], "rms_norm_eps must be > 0", fresh=True),
    train_case("train rope_theta<0", ["--set", "rope_theta=-10000"], "rope_theta must be > 0", fresh=True),
    train_case("train routed_scaling_factor=inf", ["--set", "routed_scaling_factor=inf"],
               "routed_scaling_factor must be a finite number", fresh=True),
    # train.py: the run directory.
    train_case("train --run-dir is a file", [], "is a file, not a directory",
               edit=lambda run, case: run.write_text("not a directory"), fresh=True),
    train_case("train run_config.json garbage", [], "run_config.json is not a valid run config",
               edit=lambda run, case: (run / "run_config.json").write_text("{not json")),
    train_case("train run_config.json is a list", [], "run_config.json is not a .*run config",
               edit=lambda run, case: (run / "run_config.json").write_text("[]")),
    train_case("train run_config.json without model", [], "lacks \\['model'\\]",
               edit=lambda run, case: (run / "run_config.json").write_text(json.dumps(
                   {k: v for k, v in json.loads((run / "run_config.json").read_text()).items() if k != "model"}))),
    train_case("train run_config.json model {}", [], "run config: the model config lacks",
               edit=lambda run, case: (run / "run_config.json").write_text(json.dumps(
                   {**json.loads((run / "run_config.json").read_text()), "model": {}}))),
    train_case("train run_config.json missing", [], "holds checkpoints but no run_config.json",
               edit=lambda run, case: (run / "run_config.json").unlink()),
    train_case("train tokenizer garbage", [], "tokenizer.model is not a SentencePiece model",
               edit=lambda run, case: (run / "tokenizer.model").write_bytes(b"\x00garbage" * 50)),
    train_case("train corpus changed under the same path", [], "corpus .* changed since the run", edit=changed_corpus),
    train_case("train every checkpoint damaged", [], "no intact checkpoint in .*step 3: .*step 2: .*step 1: ",
               edit=damage_all_checkpoints),
    # serve.py: resource bounds and sampling values.
    serve_case("serve --temperature inf", ["--temperature", "inf", "hi"], "temperature must be >= 0 and finite"),
    serve_case("serve --temperature nan", ["--temperature", "nan", "hi"], "temperature must be >= 0 and finite"),
    serve_case("serve --seed 10**23", ["--seed", str(10**23), "hi"], "seed must be an integer in"),
    # serve.py: bad input files.
    serve_case("serve prompts file not UTF-8", ["--prompts", "PROMPTS"], "prompts.txt is not UTF-8 text: byte 3",
               edit=write("prompts.txt", b"ok\n\xff\xfe bad\n")),
    serve_case("serve stdin not UTF-8", [], "stdin is not UTF-8 text", stdin=b"fine\n\xc3\x28\n", real_process=True),
    serve_case("serve config.json {}", ["hi"], f"config.json is not a valid model config: .*lacks {len(dataclasses.fields(ModelConfig))} field",
               edit=write("config.json", b"{}")),
    serve_case("serve config.json []", ["hi"], "config.json is not a valid model config: .*JSON object",
               edit=write("config.json", b"[]")),
    serve_case("serve config.json lacks a field", ["hi"], "lacks 1 field\\(s\\): rms_norm_eps",
               edit=edit_config(rms_norm_eps=DELETE)),
    serve_case("serve config.json unknown field", ["hi"], "unknown config field\\(s\\) \\['hiden_size'\\]",
               edit=edit_config(hiden_size=64)),
    serve_case("serve config.json rms_norm_eps=0", ["hi"], "rms_norm_eps must be > 0", edit=edit_config(rms_norm_eps=0)),
    serve_case("serve config.json rope_theta<0", ["hi"], "rope_theta must be > 0", edit=edit_config(rope_theta=-1.0)),
    serve_case("serve config.json eps as a string", ["hi"], "rms_norm_eps must be a finite number, got '1e-5'",
               edit=edit_config(rms_norm_eps="1e-5")),
    serve_case("serve config.json hidden_size true", ["hi"], "hidden_size must be a positive integer, got True",
               edit=edit_config(hidden_size=True)),
    serve_case("serve config.json rope_scaling garbage", ["hi"], "rope_scaling",
               edit=edit_config(rope_scaling={"factor": 2.0, "nonsense": 1})),
    serve_case("serve tokenizer garbage", ["hi"], "tokenizer.model is not a SentencePiece model",
               edit=write("tokenizer.model", b"\x00garbage" * 50)),
    serve_case("serve safetensors header malformed", ["hi"], "model.safetensors",
               edit=write("model.safetensors", (20).to_bytes(8, "little") + b'{"a": [1, 2, 3]}    ' + b"x" * 64)),
    Case("serve --max-new-tokens 10**30 is capped at the context", "serve",
         lambda case, ws, trained: (["--checkpoint", str(trained), "--max-new-tokens", str(10**30), "hi"], b""),
         0, None, kept="", check=tokens_capped),
    # lite.convert --out.
    convert_case("convert --out is the input", lambda case: case / "ours", "is the input checkpoint", real_process=True),
    convert_case("convert --out inside the input", lambda case: case / "ours" / "sub", "overlaps it"),
    convert_case("convert --out holds the input", lambda case: case, "overlaps it", to_hf=False),
    convert_case("convert --out holds unrelated files", unrelated_files, "holds \\['notes.txt', 'results'\\]"),
    convert_case("convert --out is another kind", lambda case: shutil.copytree(case / "hf", case / "out"),
                 "not a lite checkpoint", to_hf=False),
    convert_case("convert --out is a file", lambda case: write("out", b"x")(case) or case / "out",
                 "is a file, not a directory"),
    convert_case("convert --out is an earlier output", previous_output, None, kept="hf", check=replaced_output),
    convert_case("convert --out is empty", lambda case: mkdir(case / "out"), None, kept="ours",
                 check=lambda case, result: (case / "out" / "config.json").is_file()),
    Case("convert --to-hf config.json []", "convert",
         lambda case, ws, trained: (write("config.json", b"[]")(shutil.copytree(trained / "model", case / "ours"))
                                    or ["--to-hf", str(case / "ours"), "--out", str(case / "out")], b""),
         1, "config.json is not a valid model config"),
]


@pytest.fixture(scope="module")
def fast_results(workspace, trained, tmp_path_factory):
    """Every FAST_CASES command, with the snapshot of its case directory before: the real processes in
    the background while the others run here, one by one."""
    prepared = {}
    for case in FAST_CASES:
        directory = tmp_path_factory.mktemp("case")
        args, stdin = case.prepare(directory, workspace, trained)
        args = [str(directory / "model" / "prompts.txt") if a == "PROMPTS" else a for a in args]
        kept = directory / case.kept if case.kept else trained
        prepared[case.name] = (directory, args, stdin, kept, snapshot(kept))
    real = [case for case in FAST_CASES if case.real_process]
    with concurrent.futures.ThreadPoolExecutor(len(real)) as pool:
        futures = {case.name: pool.submit(execute, command(case.kind, *prepared[case.name][1]), ROOT,
                                          prepared[case.name][2]) for case in real}
        results = {case.name: execute_in_process(case.kind, *prepared[case.name][1:3])
                   for case in FAST_CASES if not case.real_process}
        results.update({name: future.result() for name, future in futures.items()})
    return {name: (prepared[name], results[name]) for name in prepared}


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda case: case.name)
def test_fast_case(case, fast_results):
    (directory, argv, _, kept, before), result = fast_results[case.name]
    assert result.code == case.code, f"{argv}\n{result.stdout}\n{result.stderr}"
    if case.message is None:
        assert "Traceback" not in result.stderr and not any("error" in line for line in result.lines()), result.stderr
    else:
        result.one_line(case.message)
    assert snapshot(kept) == before  # nothing that existed was changed or lost
    if case.check:
        case.check(directory, result)


# ---------------------------------------------------------------------------------------------
# Cases that train.

def test_non_finite_loss_stops_before_saving(workspace, tmp_path):
    run_dir = tmp_path / "run"
    result = execute(train_args(workspace, run_dir, "--set", "learning_rate=1e6", "--set", "grad_clip=0",
                                "--set", "steps=6"), workspace)
    assert result.code == 2
    line = result.one_line(r"step \d: .*(nan|inf).*training stopped without saving this state")
    stopped = int(line.split("step ")[1].split(":")[0])
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir())
    assert saved and max(saved) < stopped
    for step in saved:  # each kept checkpoint verifies and holds finite numbers only
        assert train.checksum_fault(run_dir / "checkpoints" / str(step)) is None
    from safetensors.numpy import load_file
    for name, array in load_file(str(run_dir / "model" / "model.safetensors")).items():
        assert np.isfinite(array).all(), name
    rows = finite_json((run_dir / "metrics.jsonl").read_text())
    assert all(math.isfinite(r["loss"]) for r in rows) and max(r["step"] for r in rows) < stopped


def flip_block(run_dir):
    data = biggest_file(run_dir / "checkpoints" / "3" / "state")
    content = bytearray(data.read_bytes())
    content[64:64 + 4096] = bytes(b ^ 0x5A for b in content[64:64 + 4096])
    data.write_bytes(bytes(content))  # same size
    return data


def delete_file(run_dir):
    data = biggest_file(run_dir / "checkpoints" / "3" / "state")
    data.unlink()
    return data


@pytest.mark.parametrize("damage", [flip_block, delete_file])
def test_damaged_newest_checkpoint_resumes_from_the_newest_intact_one(workspace, trained, tmp_path, damage):
    run_dir = copy_run(trained, tmp_path / "run")
    damage(run_dir)
    damaged = snapshot(run_dir / "checkpoints" / "3")
    older = {step: snapshot(run_dir / "checkpoints" / str(step)) for step in (1, 2)}
    result = execute(train_args(workspace, run_dir), workspace)
    assert result.code == 0, result.stderr
    result.one_line(r"warning: checkpoint .*checkpoints/3 is damaged .*moved it to .*corrupt_checkpoints/3-.* "
                    r"and resumed from step 2")
    assert f"resumed {run_dir} at step 2" in result.stdout
    (moved,) = (run_dir / "corrupt_checkpoints").iterdir()
    assert snapshot(moved) == damaged  # kept as it was, for inspection
    for step, files in older.items():  # the intact ones are untouched
        assert snapshot(run_dir / "checkpoints" / str(step)) == files
    assert train.checksum_fault(run_dir / "checkpoints" / "3") is None  # step 3 saved again
    want, got = finite_json((trained / "metrics.jsonl").read_text()), finite_json((run_dir / "metrics.jsonl").read_text())
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["loss"] for r in got[:2]] == [r["loss"] for r in want[:2]]  # the rows of the kept steps stay
    from safetensors.numpy import load_file
    for name, array in load_file(str(run_dir / "model" / "model.safetensors")).items():
        assert np.isfinite(array).all(), name


def start(argv, cwd) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for_step(process: subprocess.Popen, timeout: float = 240) -> list[str]:
    """stdout lines up to the first progress line "step N/..."."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        assert line, f"train.py ended early: {process.wait()} {process.stderr.read()}"
        lines.append(line)
        if line.startswith("step "):
            return lines
    raise AssertionError("no step printed")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_with_one_line(workspace, tmp_path, signum):
    """A second train.py on the running one's directory refuses; the signal saves and stops the first."""
    run_dir = tmp_path / "run"
    first = start(train_args(workspace, run_dir, "--set", "steps=100000", "--set", "checkpoint_every=100000"),
                  workspace)
    try:
        wait_for_step(first)
        second = execute(train_args(workspace, run_dir, "--set", "steps=100000", "--set", "checkpoint_every=100000"),
                         workspace)
        assert second.code == 2
        second.one_line(rf"{run_dir} is in use by another train.py \(process {first.pid}\)")
        assert first.poll() is None  # the first run goes on
        first.send_signal(signum)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    result = Result(first.returncode, stdout, stderr)
    assert result.code == 128 + signum
    line = result.one_line(rf"interrupted by {signal.Signals(signum).name} at step \d+: checkpoint saved")
    step = int(line.split("at step ")[1].split(":")[0])
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [step]  # not a checkpoint step
    assert train.checksum_fault(run_dir / "checkpoints" / str(step)) is None
    assert finite_json((run_dir / "metrics.jsonl").read_text())[-1]["step"] == step


def test_exported_model_is_readable_by_others_and_leaves_no_temporary_folders(trained):
    for path in (trained / "model").iterdir():
        assert path.stat().st_mode & 0o044 == (0o044 & ~current_umask()), path
    assert [p.name for p in trained.iterdir() if p.name.startswith(".model")] == []


# ---------------------------------------------------------------------------------------------
# model/ replacement (lite.checkpoint.atomic_directory, what train.py and lite.convert write with).

def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_replacing_a_directory_never_leaves_it_absent(tmp_path, monkeypatch):
    """Every rename the replacement makes is followed by a check that `model` still exists."""
    target = tmp_path / "model"
    with checkpoint.atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("1")
    absent = []
    real_rename = pathlib.Path.rename

    def watched_rename(self, destination):
        result = real_rename(self, destination)
        if not target.exists():
            absent.append((self, destination))
        return result

    monkeypatch.setattr(pathlib.Path, "rename", watched_rename)
    monkeypatch.setattr(os, "rename", lambda a, b: watched_rename(pathlib.Path(a), b))
    for version in range(2, 5):
        with checkpoint.atomic_directory(target) as tmp:
            (tmp / "config.json").write_text(str(version))
        assert (target / "config.json").read_text() == str(version)
    assert absent == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_temporary_folders_of_a_killed_writer_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".model.tmp-{pid}-abc").mkdir()
    (tmp_path / f".model.old-{pid}-abc").mkdir()
    (tmp_path / f".model.tmp-{os.getpid()}-live").mkdir()  # a writer that still runs keeps its folder
    (tmp_path / ".other.tmp-1-x").mkdir()
    with checkpoint.atomic_directory(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp-{}-live".format(os.getpid()), ".other.tmp-1-x",
                                                          "model"]
