"""Batch text generation from a checkpoint: one JSON line per prompt, then a summary line.

    python serve.py --checkpoint runs/demo "In the beginning" "And God said"
    python serve.py --checkpoint runs/demo/model --prompts prompts.txt --temperature 0.8 --top-p 0.9
    echo "In the beginning" | python serve.py --checkpoint runs/demo --max-new-tokens 32 --stop "."

The checkpoint is a directory written by `lite.checkpoint.save_model` (config.json,
model.safetensors) or a Hugging Face checkpoint directory (read directly, no conversion), holding
the SentencePiece `tokenizer.model` or a `tokenizer.json`; a train.py run directory works too
(its `model/` is used). Prompts come from the arguments, from --prompts FILE (one per line) or from
stdin (one per line); each is encoded as [BOS] + tokens, as train.py encodes documents. The whole
batch is prefilled at once and decoded by a compiled loop (lite/decode.py). Every input is checked
before anything is generated, and the output is written only once everything succeeded.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import traceback
from typing import Sequence, TextIO

import jax

from lite.checkpoint import CONFIG_FILE, CheckpointError, load_config, load_model
from lite.config import ConfigError, ModelConfig
from lite.data import DataError, Tokenizer, checkpoint_tokenizer
from lite.decode import DecodeError, Generator, Sampling, check_prompts, check_seed
from sharding.mesh import MeshSpecError, exit_at_once_if_distributed, initialize_distributed, make_mesh

class ServeError(ValueError):
    """Bad command-line input; the message says what and where."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="*", help="prompts (default: --prompts FILE, else stdin, one per line)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory, or a train.py run directory")
    parser.add_argument("--prompts", dest="prompts_file", help="a file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--mesh", help="decode sharded over all devices, e.g. expert=8 or data=2,expert=4 "
                                       "(sharding/: experts and N-gram table rows split; default: one device, "
                                       "or data over all devices on several processes); the weights are read "
                                       "straight into their shards")
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process by hand: process 0's address "
                                                                   "(every process gets the same prompts)")
    parser.add_argument("--num-processes", type=int, metavar="N", help="with --coordinator: how many processes")
    parser.add_argument("--process-id", type=int, metavar="I", help="with --coordinator: this process, 0..N-1")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace, stdin: TextIO) -> list[str]:
    """The prompts from exactly one source; empty ones are refused, naming where they are."""
    if args.prompts and args.prompts_file:
        raise ServeError("give prompts either as arguments or with --prompts FILE, not both")
    if args.prompts_file:
        path = pathlib.Path(args.prompts_file)
        if not path.is_file():
            raise ServeError(f"prompts file {path} does not exist")
        prompts, where = decoded(path.read_bytes(), str(path)).splitlines(), f"line {{}} of {path}"
    elif args.prompts:
        prompts, where = list(args.prompts), "argument {}"
    else:
        stdin_bytes = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode()
        prompts, where = decoded(stdin_bytes, "stdin").splitlines(), "line {} of stdin"
    if not prompts:
        raise ServeError("no prompts given: pass them as arguments, with --prompts FILE, or on stdin")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ServeError(f"prompt {i} ({where.format(i + 1)}) is empty")
    return prompts


def decoded(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ServeError(f"{source} is not UTF-8 text: byte {error.start} (line {line}) is "
                         f"{data[error.start:error.start + 1]!r}") from None


def resolve_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
    """A train.py run directory stands for its exported `model/` directory."""
    path = pathlib.Path(path)
    return path / "model" if (path / "model" / CONFIG_FILE).is_file() else path


def load_tokenizer(directory: pathlib.Path, cfg: ModelConfig) -> Tokenizer:
    """The checkpoint's tokenizer.model or tokenizer.json (+ tokenizer_config.json), checked against its config."""
    try:
        return checkpoint_tokenizer(directory, cfg)
    except DataError as error:
        raise CheckpointError(str(error)) from None


def serve(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> None:
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise ServeError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_seed(args.seed)
    if any(s == "" for s in args.stop):
        raise ServeError("--stop was given an empty string")
    prompts = read_prompts(args, stdin)
    directory = resolve_checkpoint(args.checkpoint)
    cfg = load_config(directory)
    tokenizer = load_tokenizer(directory, cfg)
    ids = [[cfg.bos_token_id] + tokenizer.encode(prompt) for prompt in prompts]
    check_prompts(ids, cfg)  # before the weights are read: a too-long prompt fails fast
    if args.mesh:
        mesh = make_mesh(args.mesh)
    else:  # several processes decode one batch together: it is split over all of their devices
        mesh = make_mesh(f"data={jax.device_count()}") if jax.process_count() > 1 else None
    generator = Generator(load_model(directory, mesh=mesh), vocab_limit=tokenizer.get_piece_size(), mesh=mesh)
    completions, stats = generator.generate(ids, args.max_new_tokens, sampling, args.seed, stop_strings=args.stop,
                                            detokenize=tokenizer.decode)
    lines = [json.dumps(dict(prompt=prompt, completion=c.text, token_ids=c.token_ids, num_tokens=len(c.token_ids),
                             stop_reason=c.stop_reason), ensure_ascii=False)
             for prompt, c in zip(prompts, completions)]
    rate = lambda tokens, seconds: round(tokens / seconds, 1) if seconds > 0 else None  # noqa: E731
    lines.append(json.dumps(dict(summary=dict(
        prompts=len(prompts), prefill_tokens=stats.prefill_tokens, prefill_seconds=round(stats.prefill_seconds, 4),
        prefill_tokens_per_s=rate(stats.prefill_tokens, stats.prefill_seconds),
        decode_tokens=stats.decode_tokens, decode_seconds=round(stats.decode_seconds, 4),
        decode_tokens_per_s=rate(stats.decode_tokens, stats.decode_seconds),
        compile_seconds=round(stats.compile_seconds, 2)))))
    if jax.process_index() == 0:  # written once
        stdout.write("\n".join(lines) + "\n")
        stdout.flush()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        initialize_distributed(coordinator=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
        serve(args, sys.stdin, sys.stdout)
    except (ServeError, DecodeError, CheckpointError, ConfigError, MeshSpecError,
            OSError) as error:  # OSError: an unreadable file, a full disk (the OS names the file and why)
        if jax.process_count() > 1:  # leave at once: never wait in a shutdown barrier for the others
            print(f"serve.py: error: {error}", file=sys.stderr)
            exit_at_once_if_distributed(1)
        raise SystemExit(f"serve.py: error: {error}") from None
    except KeyboardInterrupt:
        if jax.process_count() > 1:
            print("serve.py: interrupted", file=sys.stderr)
            exit_at_once_if_distributed(130)
        raise SystemExit("serve.py: interrupted; nothing was written") from None
    except BaseException:
        if jax.process_count() > 1:
            traceback.print_exc()
            exit_at_once_if_distributed(1)
        raise


if __name__ == "__main__":
    main()
