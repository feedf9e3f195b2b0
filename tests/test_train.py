"""The training step against optax's own AdamW and NumPy; train.py end to end: errors, outputs, and
bitwise-exact resume after SIGKILL (subprocesses, tiny preset, a corpus written by the test)."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lite.config import ConfigError, get_config
from lite.model import LongcatModel, next_token_loss
from lite.ngram import ngram_ids
from lite.training import (TrainConfig, expert_load_metrics, init_state, learning_rate, make_train_step,
                           parse_overrides, weight_decay_mask, z_loss)

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Pieces of the step.

def test_learning_rate_warmup_then_cosine():
    tcfg = TrainConfig(learning_rate=1e-2, warmup_ratio=0.1, min_learning_rate_ratio=0.2)
    total, warmup = 200, 20
    for step in (0, 5, 19, 20, 21, 77, 150, 199, 200, 260):
        if step < warmup:
            want = 1e-2 * (step + 1) / warmup
        else:
            progress = min((step - warmup) / (total - warmup), 1.0)
            want = 1e-2 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert float(learning_rate(step, total, tcfg)) == pytest.approx(want, rel=1e-5), step


def test_weight_decay_skips_norms_biases_and_tables():
    abstract = nnx.eval_shape(lambda: LongcatModel(get_config("tiny"), rngs=nnx.Rngs(0)))
    mask = {jax.tree_util.keystr(path): value
            for path, value in jax.tree_util.tree_leaves_with_path(weight_decay_mask(nnx.state(abstract, nnx.Param)))}
    decayed = {name for name, value in mask.items() if value}
    assert any("q_a_proj" in name for name in decayed) and any("w_gate" in name for name in decayed)
    assert any("lm_head" in name for name in decayed) and any("ngram_proj" in name for name in decayed)
    for name in mask:
        if any(word in name for word in ("norm", "token_table", "ngram_table")):
            assert name not in decayed, name
    assert not any("bias" in name for name in mask)  # the router bias is no Param: no optimizer state at all


def test_train_step_matches_optax_adamw_and_moves_the_router_bias():
    cfg = get_config("tiny")
    # adam_eps 1e-4: with a tiny eps, Adam turns float noise in near-zero gradients into +-lr updates.
    tcfg = TrainConfig(learning_rate=1e-2, weight_decay=0.3, grad_clip=0.5, warmup_ratio=0.25, adam_eps=1e-4)
    graphdef, state, tx = init_state(cfg, tcfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 12)), jnp.int32)
    segments = jnp.asarray([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], jnp.int32)
    step = jax.jit(make_train_step(graphdef, tx, cfg, tcfg))

    # Reference: optax.adamw with the same schedule and mask, gradients of the plain loss.
    reference_tx = optax.chain(optax.clip_by_global_norm(0.5),
                               optax.adamw(lambda count: learning_rate(count, 8, tcfg), b1=0.9, b2=0.95, eps=1e-4,
                                           weight_decay=0.3, mask=weight_decay_mask(state.params)))

    @jax.jit
    def reference_step(params, other, opt):
        def loss_fn(p):
            out = nnx.merge(graphdef, p, other)(tokens, segments)
            return next_token_loss(out.logits, tokens, segments)[0], out.expert_counts

        (_, counts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = reference_tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        model = nnx.merge(graphdef, params, other)
        model.update_router_bias(counts)
        return params, nnx.state(model, nnx.Not(nnx.Param)), opt, grads

    params, other = state.params, state.other
    opt = reference_tx.init(params)
    for _ in range(3):
        params, other, opt, grads = reference_step(params, other, opt)
        state, metrics = step(state, tokens, segments, jnp.int32(8))

    for want, got in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(state.other)[0]), np.asarray(jax.tree.leaves(other)[0]),
                               atol=1e-7)
    assert np.abs(np.asarray(jax.tree.leaves(state.other)[0])).max() > 0  # the bias did move
    assert int(state.step) == 3
    assert float(metrics["learning_rate"]) == pytest.approx(float(learning_rate(2, 8, tcfg)))
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)
    # Rows touched: distinct flat N-gram rows of the non-padding tokens, counted in NumPy.
    ids = np.asarray(ngram_ids(tokens, cfg, segments)) + np.asarray(cfg.ngram_table_offsets)
    assert int(metrics["ngram_rows_touched"]) == len(np.unique(ids[np.asarray(segments) > 0]))


def test_z_loss_matches_numpy():
    logits = np.random.default_rng(1).normal(size=(2, 5, 7)).astype(np.float32) * 3
    segments = np.array([[1, 1, 2, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    want = (lse ** 2)[segments > 0].mean()
    assert float(z_loss(jnp.asarray(logits), jnp.asarray(segments))) == pytest.approx(want, rel=1e-5)


def test_expert_load_metrics_by_hand():
    cfg = get_config("tiny")  # 4 FFN experts, 2 zero experts, top-2
    counts = np.array([[10, 30, 20, 40, 50, 50], [25, 25, 25, 25, 0, 0]], np.float32)
    load = expert_load_metrics(counts, cfg)
    assert load["load_min_share"] == [0.1, 0.25] and load["load_max_share"] == [0.4, 0.25]
    assert load["zero_expert_share"] == [0.5, 0.0]
    assert load["ffn_experts_per_token"] == pytest.approx([100 / 100, 100 / 50])  # FFN slots / tokens


def test_overrides_are_typed_and_unknown_keys_rejected():
    cfg, tcfg = get_config("tiny"), TrainConfig()
    model, train = parse_overrides(["hidden_size=128", "compute_dtype=bfloat16", "learning_rate=1e-3",
                                    "steps=7"], cfg, tcfg)
    assert model == {"hidden_size": 128, "compute_dtype": "bfloat16"}
    assert train == {"learning_rate": 1e-3, "steps": 7}
    with pytest.raises(ConfigError, match=r"unknown key \(did you mean 'hidden_size'\?\)"):
        parse_overrides(["hiden_size=3"], cfg, tcfg)
    with pytest.raises(ConfigError, match=r"unknown key \(did you mean 'learning_rate'\?\)"):
        parse_overrides(["learning_rat=3"], cfg, tcfg)
    with pytest.raises(ConfigError, match="batch_size must be int"):
        parse_overrides(["batch_size=eight"], cfg, tcfg)
    with pytest.raises(ConfigError, match="cannot be set"):
        parse_overrides(["rope_scaling=2"], cfg, tcfg)


# ---------------------------------------------------------------------------------------------
# train.py end to end.

COMMON = ["--preset", "tiny", "--set", "steps=8", "--set", "log_every=1", "--set", "eval_every=4",
          "--set", "checkpoint_every=2", "--set", "keep_checkpoints=2", "--set", "batch_size=4",
          "--set", "seq_len=32", "--set", "sample_tokens=4"]


def run_train(workspace, run_dir, *extra, env=None):
    command = [sys.executable, str(ROOT / "train.py"), *COMMON, "--data", str(workspace / "corpus.txt"),
               "--cache-dir", str(workspace / "cache"), "--run-dir", str(run_dir), *extra]
    return subprocess.Popen(command, cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def finish(process, timeout=240):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    run_dir = workspace / "straight"
    code, output = finish(run_train(workspace, run_dir))
    assert code == 0, output
    return run_dir, output


def test_a_run_writes_config_metrics_plots_model_and_samples(uninterrupted):
    from lite.checkpoint import load_model

    run_dir, output = uninterrupted
    # Only what differs from the preset is printed (batch_size); the preset's own hidden_size is not.
    assert "settings that differ from the preset's" in output and "  batch_size = 4" in output
    assert "  hidden_size = " not in output
    assert "validation loss" in output and "unigram entropy" in output and output.count("\n> ") == 3
    run = json.loads((run_dir / "run_config.json").read_text())
    assert run["model"]["name"] == "tiny" and run["train"]["steps"] == 8 and run["planned_steps"] == 8
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("loss", "tokens_per_s", "mfu", "grad_norm", "ngram_rows_touched", "load_min_share",
                "load_max_share", "ffn_experts_per_token", "zero_expert_share", "learning_rate"):
        assert all(key in r for r in rows), key
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert len(rows[0]["load_max_share"]) == 2  # per layer
    for name in ("loss.png", "expert_load.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [6, 8]
    model = load_model(run_dir / "model")
    assert model.cfg.name == "tiny"
    assert (run_dir / "model" / "tokenizer.model").read_bytes() == (run_dir / "tokenizer.model").read_bytes()


def test_sigkill_then_resume_is_bitwise_identical(workspace, uninterrupted):
    straight, _ = uninterrupted
    run_dir = workspace / "killed"
    process = run_train(workspace, run_dir)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill mid-run: after step 5 is logged (checkpoints at 2 and 4 exist)
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= 5 for r in metrics(run_dir)[-1:]):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    code, output = finish(run_train(workspace, run_dir))
    assert code == 0, output
    resumed_at = int(output.split("resumed ")[1].split(" at step ")[1].split()[0])
    assert 0 < resumed_at < 8
    want, got = metrics(straight), metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r.get("val_loss") for r in got] == [r.get("val_loss") for r in want]
    a, b = weights(straight), weights(run_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_resume_refuses_other_settings_and_no_resume_refuses_existing_run(workspace, uninterrupted):
    straight, _ = uninterrupted
    code, output = finish(run_train(workspace, straight, "--set", "learning_rate=0.1"))
    assert code == 2 and "learning_rate=0.1 (run: 0.003)" in output and "another --run-dir" in output
    code, output = finish(run_train(workspace, straight, "--no-resume"))
    assert code == 2 and "already holds a run" in output


def test_bad_input_messages(workspace, tmp_path, capsys):
    import train

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for extra, message in ((["--set", "no_such_key=1"], "--set no_such_key: unknown key"),
                           (["--set", "batch_size=four"], "batch_size must be int, got 'four'"),
                           (["--set", "learning_rate=-1"], "learning_rate must be > 0"),
                           (["--set", "hidden_size=0"], "hidden_size must be a positive integer"),
                           (["--data", str(tmp_path / "missing.txt")], "missing.txt does not exist"),
                           (["--data", str(empty)], "empty.txt is empty")):
        args = [*COMMON, "--data", str(workspace / "corpus.txt"), "--cache-dir", str(workspace / "cache"),
                "--run-dir", str(tmp_path / "run"), *extra]
        assert train.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_batch_not_divisible_by_data_parallel_size(workspace, tmp_path):
    process = run_train(workspace, tmp_path / "run", "--mesh", "data=2,expert=1", "--set", "batch_size=3",
                        env={"XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"})
    code, output = finish(process)
    assert code == 2 and "batch_size=3 is not divisible by the data-parallel size 2" in output


def test_init_from_a_checkpoint_continues_from_its_weights(workspace, uninterrupted, tmp_path):
    """--init-from: a new run with the checkpoint's config, tokenizer and weights (fresh optimizer);
    the loss of its first step, taken before the update, is the checkpoint's loss on that batch."""
    from lite.checkpoint import load_model
    from lite.data import encode_documents, load_corpus, load_tokenizer, training_batches

    straight, _ = uninterrupted
    source = straight / "model"
    run_dir = tmp_path / "tuned"
    code, output = finish(run_train(workspace, run_dir, "--init-from", str(source), "--set", "steps=1",
                                    "--set", "sample_tokens=0"))
    assert code == 0, output
    assert "initialized from" in output
    assert (run_dir / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    run = json.loads((run_dir / "run_config.json").read_text())
    assert run["init_from"] == str(source) and run["model"]["name"] == "tiny"
    model = load_model(source)
    tokenizer = load_tokenizer(source / "tokenizer.model")
    docs = encode_documents(tokenizer, load_corpus([workspace / "corpus.txt"]).train, model.cfg)
    batch = next(iter(training_batches(docs, 32, 4, seed=0)))
    out = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]))
    want, _ = next_token_loss(out.logits, jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]))
    assert metrics(run_dir)[0]["loss"] == pytest.approx(float(want), rel=1e-5)
    code, output = finish(run_train(workspace, run_dir, "--init-from", str(source)))
    assert code == 2 and "--init-from starts a new run" in output
