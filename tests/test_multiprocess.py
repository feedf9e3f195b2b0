"""Two processes on one machine (jax.distributed with gloo between their CPU devices, tiny preset,
data=2): train.py trains, checkpoints, is killed, resumes bit for bit and exports; serve.py on two
processes decodes the same tokens as on one. Every subprocess runs under a timeout: a hang fails."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["--preset", "tiny", "--set", "steps=6", "--set", "log_every=1", "--set", "eval_every=3",
         "--set", "checkpoint_every=2", "--set", "keep_checkpoints=2", "--set", "batch_size=4",
         "--set", "seq_len=32", "--set", "sample_tokens=0", "--mesh", "data=2"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, processes: int = 2, env: dict | None = None) -> list[subprocess.Popen]:
    """`script args` as `processes` processes of one jax.distributed run (or one plain process)."""
    port = free_port()
    distributed = lambda i: (["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),  # noqa: E731
                              "--process-id", str(i)] if processes > 1 else [])
    return [subprocess.Popen([sys.executable, str(ROOT / script), *args, *distributed(i)], cwd=ROOT, env={**ENV, **(env or {})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]


def finish(processes: list[subprocess.Popen], timeout: float = 420) -> list[tuple[int, str, str]]:
    deadline = time.time() + timeout
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"{process.args[1]} hung for {timeout} s")
        results.append((process.returncode, out, err))
    return results


def train_args(workspace, run_dir):
    # A shared compilation cache: the killed and the resumed run reuse the first run's programs.
    return [*TRAIN, "--data", str(workspace / "corpus.txt"), "--cache-dir", str(workspace / "cache"),
            "--run-dir", str(run_dir)]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(workspace):
    run_dir = workspace / "two-process-straight"
    results = finish(launch("train.py", *train_args(workspace, run_dir)))
    for code, out, err in results:
        assert code == 0, out[-3000:] + err[-3000:]
    return run_dir, results


def test_two_processes_train_and_write_everything_once(straight):
    run_dir, [(_, out0, _), (_, out1, _)] = straight
    assert "2 process(es)" in out0 and "validation loss" in out0 and "step 6/6" in out0
    assert "validation loss" not in out1 and "step " not in out1  # progress and report: process 0 only
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7))  # one row per step, not one per process
    assert (run_dir / "loss.png").exists() and (run_dir / "model" / "tokenizer.model").exists()


def test_killed_process_ends_the_other_then_resume_is_bitwise_identical(workspace, straight):
    want_dir, _ = straight
    run_dir = workspace / "two-process-killed"
    processes = launch("train.py", *train_args(workspace, run_dir))
    deadline = time.time() + 300
    while time.time() < deadline:  # after step 3 is logged: the checkpoint of step 2 exists
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= 3 for r in metrics(run_dir)):
            break
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGKILL)
    (code0, _, err0), _ = finish(processes, timeout=200)  # process 0 must not wait forever for process 1
    assert code0 != 0, err0[-3000:]
    results = finish(launch("train.py", *train_args(workspace, run_dir)))
    for code, out, err in results:
        assert code == 0, out[-3000:] + err[-3000:]
    assert "resumed " in results[0][1]
    want, got = metrics(want_dir), metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r.get("val_loss") for r in got] == [r.get("val_loss") for r in want]
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (want_dir, run_dir))
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_serving_on_two_processes_equals_one(straight):
    """The same mesh (data=2) on one process with two devices and on two processes with one each:
    the same sampled tokens (sampling, so that the barely trained model's tokens vary)."""
    run_dir, _ = straight
    prompts = ["and the lord spake", "unto moses saying speak unto the children"]
    args = ["--checkpoint", str(run_dir), "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "3",
            "--mesh", "data=2", *prompts]
    [(code, alone, err)] = finish(launch("serve.py", *args, processes=1,
                                         env={"XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"}))
    assert code == 0, err[-3000:]
    (code0, out0, err0), (code1, out1, err1) = finish(launch("serve.py", *args))
    assert code0 == code1 == 0, err0[-3000:] + err1[-3000:]
    assert '"token_ids"' not in out1  # written once, by process 0
    ids = lambda out: [json.loads(line)["token_ids"] for line in out.splitlines()  # noqa: E731
                       if '"token_ids"' in line]  # gloo prints a line of its own
    assert ids(out0) == ids(alone) and len(ids(alone)) == 2
    assert len({t for row in ids(alone) for t in row}) > 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="127.0.0.1:1234"), "go together"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "'localhost' is not HOST:PORT"),
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), r"--process-id 2 must lie in \[0, "),
])
def test_launch_flags_are_checked_before_anything_starts(kwargs, message):
    from sharding.mesh import MeshSpecError, initialize_distributed

    with pytest.raises(MeshSpecError, match=message):
        initialize_distributed(**kwargs)
