"""train.py's command line and run directory: TensorBoard event files and metrics.jsonl rows, what it
prints, samples.txt, --print-config, --help, continuing a finished run (--set steps=N), --overwrite.

One tiny run of 4 steps, continued to 6, then overwritten by a 1-step run (subprocesses sharing one
compilation cache); the rest runs in this process without training.
"""

import dataclasses
import json
import pathlib
import re
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import train
from lite.config import PRESETS, ModelConfig
from lite.training import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = ["--preset", "tiny", "--set", "log_every=1", "--set", "eval_every=2", "--set", "checkpoint_every=2",
            "--set", "batch_size=4", "--set", "seq_len=32", "--set", "sample_tokens=4"]
BATCH_TOKENS = 4 * 32
PEAK_LR, MIN_LR_RATIO = TrainConfig().learning_rate, TrainConfig().min_learning_rate_ratio


def run_train(workspace, *extra):
    """(exit status, stdout, stderr) of python train.py on the workspace's corpus, in workspace/run."""
    command = [sys.executable, str(ROOT / "train.py"), *SETTINGS, "--data", str(workspace / "corpus.txt"),
               "--cache-dir", str(workspace / "cache"), "--run-dir", str(workspace / "cli-run"), *extra]
    done = subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def strict_rows(run_dir):
    """metrics.jsonl rows, refusing the NaN / Infinity that Python's json writes and reads by default."""
    def refuse(constant):
        raise ValueError(f"bare {constant} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(directory):
    """{(tag, step): (value, wall time)} of every scalar in the TFRecord event files under `directory`,
    each record's framing and checksums verified as TensorBoard's reader does."""
    scalars = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos: pos + 8]
            (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack_from("<I", data, pos + 8)
            assert header_crc == masked_crc(header), path
            body = data[pos + 12: pos + 12 + length]
            (body_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
            assert body_crc == masked_crc(body), path
            event = event_pb2.Event.FromString(body)
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = (value.simple_value, event.wall_time)
            pos += 12 + length + 4
    return scalars


@pytest.fixture(scope="module")
def first(workspace):
    """A finished 4-step run: its output and what it wrote (copied: later fixtures change the directory)."""
    began = time.time()
    code, out, err = run_train(workspace, "--set", "steps=4")
    assert code == 0, out + err
    run_dir = workspace / "cli-run"
    return dict(out=out, began=began, ended=time.time(), rows=strict_rows(run_dir),
                events=read_events(run_dir / "tensorboard"), samples=(run_dir / "samples.txt").read_text())


@pytest.fixture(scope="module")
def continued(workspace, first):
    code, out, err = run_train(workspace, "--set", "steps=6")
    assert code == 0, out + err
    run_dir = workspace / "cli-run"
    return dict(out=out, err=err, rows=strict_rows(run_dir), events=read_events(run_dir / "tensorboard"),
                config=json.loads((run_dir / "run_config.json").read_text()))


def test_metrics_rows_carry_time_step_time_and_tokens_seen(first):
    rows = first["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    times = [r["time"] for r in rows]
    assert first["began"] < times[0] and times == sorted(times) and times[-1] < first["ended"]
    for r in rows:
        assert r["tokens_seen"] == r["step"] * BATCH_TOKENS
        assert r["step_time_s"] > 0 and r["tokens_per_s"] == pytest.approx(BATCH_TOKENS / r["step_time_s"], rel=2e-3)


def test_tensorboard_events_hold_every_logged_scalar(first):
    events, rows = first["events"], first["rows"]
    for r in rows:
        want = {"train/loss": r["loss"], "train/learning_rate": r["learning_rate"],
                "train/grad_norm": r["grad_norm"], "train/tokens_per_s": r["tokens_per_s"], "train/mfu": r["mfu"],
                "train/step_time_s": r["step_time_s"], "train/tokens_seen": r["tokens_seen"]}
        want.update({f"{key}/layer_{layer:02d}": v for key in ("load_max_share", "ffn_experts_per_token")
                     for layer, v in enumerate(r[key])})
        if "val_loss" in r:
            want["validation/loss"] = r["val_loss"]
        for tag, value in want.items():
            got, wall_time = events[(tag, r["step"])]
            assert got == np.float32(value), (tag, r["step"])
            assert wall_time == pytest.approx(r["time"], abs=1e-3)
    assert {step for (tag, step) in events if tag == "validation/loss"} == {2, 4}
    assert {tag for tag, _ in events if "/layer_" in tag} >= {"load_max_share/layer_00", "load_max_share/layer_01"}


def test_output_names_changes_compiling_samples_and_the_entropy_gap(workspace, first):
    out = first["out"]
    assert (out.index("settings that differ") < out.index("compiling and running the model's initialization")
            < out.index("compiling the training and validation steps") < out.index("step 1/4"))
    changes = out[out.index("settings that differ from the preset's"): out.index("compiling and running")]
    for line in ("  batch_size = 4", "  seq_len = 32", "  steps = 4", "  sample_tokens = 4"):
        assert line in changes
    assert "hidden_size" not in changes and "learning_rate" not in changes  # the preset's and the defaults
    assert first["samples"].splitlines() == [line for line in out.splitlines() if line.startswith("> ")]
    assert len(first["samples"].splitlines()) == 3
    found = re.search(r"validation loss (\d+\.\d+) nats per token: (\d+\.\d+) nats (above|below) the unigram entropy "
                      r"of the corpus \((\d+\.\d+) nats\)", out)
    assert found, out
    val, gap, side, entropy = float(found[1]), float(found[2]), found[3], float(found[4])
    assert val == pytest.approx(first["rows"][-1]["val_loss"], abs=5e-4)
    assert side == ("below" if val < entropy else "above") and gap == pytest.approx(abs(val - entropy), abs=1.5e-3)
    assert "NOT below" not in out


def test_entropy_comparison_wording():
    assert train.compared_to_entropy(2.5, 2.75) == "0.250 nats below the unigram entropy of the corpus (2.750 nats)"
    assert train.compared_to_entropy(3.0, 2.75) == "0.250 nats above the unigram entropy of the corpus (2.750 nats)"


def test_a_finished_run_continues_at_the_schedules_final_learning_rate(first, continued):
    rows = continued["rows"]
    assert "resumed" in continued["out"] and "at step 4" in continued["out"]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[:4] == first["rows"]  # the first run's rows are kept as they were
    for r in rows[4:]:  # past the 4 planned steps: the cosine's floor, peak x min_learning_rate_ratio
        assert r["learning_rate"] == pytest.approx(PEAK_LR * MIN_LR_RATIO, rel=1e-6)
        assert r["tokens_seen"] == r["step"] * BATCH_TOKENS
    assert continued["config"]["planned_steps"] == 4 and continued["config"]["train"]["steps"] == 6
    assert {step for (tag, step) in continued["events"] if tag == "train/loss"} == set(range(1, 7))
    assert continued["events"][("train/loss", 6)][0] == np.float32(rows[-1]["loss"])
    # Nothing from orbax or absl's Python logging on a resume (the jax CUDA plugin's own lines, on a
    # machine with the plugin and no GPU, come from every start and are jax's, not ours).
    noise = [line for line in continued["err"].splitlines()
             if re.match(r"(WARNING|ERROR|INFO):(absl|orbax|grain)|[WEI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.py:", line)]
    assert not noise, continued["err"]


def test_continuing_needs_more_steps_and_a_learning_rate_left(tmp_path):
    run = {"train": {**dataclasses.asdict(TrainConfig()), "steps": 0}, "planned_steps": 40}  # planned from minutes
    assert train.continued(run, None, tmp_path) is run and train.continued(run, 40, tmp_path) is run
    longer = train.continued(run, 90, tmp_path)
    assert longer["train"]["steps"] == 90 and longer["planned_steps"] == 40 and run["train"]["steps"] == 0
    with pytest.raises(train.RunError, match="trains to step 40; a run can be continued for more steps, not shortened"):
        train.continued(run, 39, tmp_path)
    no_floor = {**run, "train": {**run["train"], "min_learning_rate_ratio": 0.0}}
    with pytest.raises(train.RunError, match="ends its schedule at learning rate 0"):
        train.continued(no_floor, 90, tmp_path)


def test_a_run_cannot_be_shortened_and_overwrite_starts_afresh(workspace, continued, capsys):
    run_dir = workspace / "cli-run"
    assert train.main([*SETTINGS, "--set", "steps=5", "--data", str(workspace / "corpus.txt"), "--cache-dir",
                       str(workspace / "cache"), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "trains to step 6" in err and "not shortened" in err, err
    (run_dir / "notes.txt").write_text("mine")
    code, out, err = run_train(workspace, "--overwrite", "--set", "steps=1", "--set", "sample_tokens=0")
    assert code == 0, out + err
    assert "--overwrite: deleted" in out
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in strict_rows(run_dir)] == [1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    assert not (run_dir / "samples.txt").exists()
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["planned_steps"] == 1 and config["train"]["steps"] == 1
    assert {step for (tag, step) in read_events(run_dir / "tensorboard") if tag == "train/loss"} == {1}


def test_overwrite_deletes_only_the_runs_own_files(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.bin").write_text("x")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "2").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / "my_data.txt").write_text("y")
    (run_dir / "model").symlink_to(outside, target_is_directory=True)
    said = []
    train.discard_run(run_dir, said.append)
    assert sorted(p.name for p in run_dir.iterdir()) == ["my_data.txt"]
    assert (outside / "keep.bin").read_text() == "x"
    assert said and "checkpoints" in said[0] and "metrics.jsonl" in said[0]


def test_overwrite_and_resume_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--overwrite", "--resume"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_print_config_lists_every_setting_and_runs_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(["--preset", "tiny", "--set", "hidden_size=32", "--set", "steps=7", "--run-dir", str(run_dir),
                       "--print-config"]) == 0
    out = capsys.readouterr().out
    printed = dict(re.findall(r"^  (\w+) = (.*)$", out, re.M))
    tiny = dataclasses.asdict(PRESETS["tiny"])
    assert set(printed) == {f.name for config in (ModelConfig, TrainConfig) for f in dataclasses.fields(config)}
    assert printed["hidden_size"] == "32" and printed["steps"] == "7"
    assert printed["num_layers"] == repr(tiny["num_layers"]) and printed["learning_rate"] == repr(PEAK_LR)
    assert not run_dir.exists()


def test_help_lists_the_presets_and_how_a_run_continues(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(name in out for name in ("tiny", "demo", "longcat-flash-lite", "longcat-flash"))
    assert "--overwrite" in out and "--print-config" in out and "final learning rate" in out


def test_unknown_set_key_suggests_the_nearest(tmp_path, capsys):
    assert train.main(["--preset", "tiny", "--set", "learnig_rate=0.01", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set learnig_rate: unknown key (did you mean 'learning_rate'?)"), err
    assert not (tmp_path / "run").exists()
