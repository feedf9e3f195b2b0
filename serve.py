"""Batch text generation from a checkpoint: plain prompts, or JSONL requests in and out.

    python serve.py --checkpoint runs/demo "In the beginning" "And God said"
    python serve.py --checkpoint runs/demo/model --prompts prompts.txt --temperature 0.8 --top-p 0.9
    echo "In the beginning" | python serve.py --checkpoint runs/demo --max-new-tokens 32 --stop "."
    python serve.py --checkpoint runs/demo --input requests.jsonl --output results.jsonl

The checkpoint is a directory written by `lite.checkpoint.save_model` (config.json,
model.safetensors) or a Hugging Face checkpoint directory (read directly, no conversion), holding
the SentencePiece `tokenizer.model` or a `tokenizer.json`; a train.py run directory works too
(its `model/` is used). Prompts come from the arguments, from --prompts FILE (one per line) or from
stdin (one per line), and then one JSON line per prompt and a summary line go to stdout once all
are done. With --input, each line of the file is a request (`id`, `prompt`, optional
`max_new_tokens`, `temperature`, `top_k`, `top_p`, `stop`, `seed`; the command-line values are the
defaults), and one result line per request, in input order, goes to --output (or stdout) as soon as
its batch is done; the summary goes to stderr. Each prompt is encoded as [BOS] + tokens, as
train.py encodes documents; batches of up to --batch-size requests are prefilled at once and
decoded by a compiled loop (lite/decode.py), each request with its own settings. Every input is
checked before anything is generated.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import itertools
import json
import pathlib
import sys
import time
import traceback
from typing import Iterable, Iterator, Sequence, TextIO

import jax

from lite.checkpoint import CONFIG_FILE, CheckpointError, load_config, load_model
from lite.config import ConfigError, ModelConfig
from lite.data import DataError, Tokenizer, checkpoint_tokenizer
from lite.decode import Completion, DecodeError, GenerationStats, Generator, Sampling, check_seed, prompt_problem
from sharding.mesh import MeshSpecError, exit_at_once_if_distributed, initialize_distributed, make_mesh

class ServeError(ValueError):
    """Bad command-line input; the message says what and where."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="*", help="prompts (default: --prompts FILE, else stdin, one per line)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory, or a train.py run directory")
    parser.add_argument("--prompts", dest="prompts_file", help="a file with one prompt per line")
    parser.add_argument("--input", help="a JSONL file of requests: id, prompt, and optionally max_new_tokens, "
                                        "temperature, top_k, top_p, stop (a string or a list), seed")
    parser.add_argument("--output", help="with --input: the JSONL file of results (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=64, help="requests decoded together (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0, help="request i (from 0) without a seed of its own "
                                                            "samples with seed + i")
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


@dataclasses.dataclass
class Request:
    """One prompt and how to continue it."""

    id: str | int | None  # None for plain prompts
    prompt: str
    token_ids: list[int]  # [BOS] + the prompt's tokens
    max_new_tokens: int
    sampling: Sampling
    seed: int
    stop: list[str]


REQUEST_FIELDS = ("id", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "stop", "seed")


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


def default_settings(args: argparse.Namespace) -> dict:
    """The command line's generation settings, checked: every request's defaults."""
    if args.max_new_tokens < 1:
        raise ServeError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ServeError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_seed(args.seed)
    Sampling(args.temperature, args.top_k, args.top_p)
    if any(s == "" for s in args.stop):
        raise ServeError("--stop was given an empty string")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, stop=list(args.stop))


def plain_requests(prompts: Sequence[str], defaults: dict, seed: int, tokenizer: Tokenizer,
                   cfg: ModelConfig) -> list[Request]:
    requests = []
    for i, prompt in enumerate(prompts):
        ids = [cfg.bos_token_id] + tokenizer.encode(prompt)
        problem = prompt_problem(ids, cfg)
        if problem:  # before the weights are read: a too-long prompt fails fast
            raise DecodeError(f"prompt {i} {problem}")
        requests.append(Request(None, prompt, ids, defaults["max_new_tokens"],
                                Sampling(defaults["temperature"], defaults["top_k"], defaults["top_p"]),
                                (seed + i) % 2**63, defaults["stop"]))
    return requests


def jsonl_requests(path: pathlib.Path, defaults: dict, seed: int, tokenizer: Tokenizer,
                   cfg: ModelConfig) -> Iterator[Request]:
    """The requests of a JSONL file, one at a time (the file is never held whole); each bad line
    raises a ServeError that names its line number and the problem. Blank lines are skipped."""
    seen: dict[tuple[str, str | int], int] = {}  # (type, id) -> its line
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            where = f"line {number} of {path}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ServeError(f"{where} is not UTF-8 text: byte {error.start} of the line is "
                                 f"{raw[error.start:error.start + 1]!r}") from None
            if not line.strip():
                continue
            request = parse_request(line, where, defaults, seed + len(seen), tokenizer, cfg)
            key = (type(request.id).__name__, request.id)  # 1 and "1" are two ids
            if key in seen:
                raise ServeError(f"{where}: id {request.id!r} is already the id of line {seen[key]}")
            seen[key] = number
            yield request


def parse_request(line: str, where: str, defaults: dict, seed: int, tokenizer: Tokenizer,
                  cfg: ModelConfig) -> Request:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as error:
        raise ServeError(f"{where} is not valid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(fields, dict):
        raise ServeError(f"{where}: a request is a JSON object, got {type(fields).__name__}")
    unknown = [key for key in fields if key not in REQUEST_FIELDS]
    if unknown:
        hints = [f"{key!r}: did you mean {close[0]!r}?" for key in unknown
                 if (close := difflib.get_close_matches(key, REQUEST_FIELDS, n=1, cutoff=0.6))]
        raise ServeError(f"{where}: unknown field(s) {unknown}{' (' + '; '.join(hints) + ')' if hints else ''}; "
                         f"a request has {', '.join(REQUEST_FIELDS)}")
    for key in ("id", "prompt"):
        if fields.get(key) is None:
            raise ServeError(f"{where}: the request has no {key!r}")
    request_id, prompt = fields["id"], fields["prompt"]
    if not (isinstance(request_id, str) or (isinstance(request_id, int) and not isinstance(request_id, bool))):
        raise ServeError(f"{where}: id must be a string or an integer, got {request_id!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ServeError(f"{where}: prompt must be a non-empty string, got {prompt!r}")
    given = {key: fields[key] for key in REQUEST_FIELDS[2:] if fields.get(key) is not None}
    settings = {**defaults, **given}
    max_new_tokens, stop, seed = settings["max_new_tokens"], settings["stop"], given.get("seed", seed % 2**63)
    if not (isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 1):
        raise ServeError(f"{where}: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ServeError(f"{where}: stop must be a non-empty string or a list of them, got {settings['stop']!r}")
    try:
        check_seed(seed)
        sampling = Sampling(settings["temperature"], settings["top_k"], settings["top_p"])
    except DecodeError as error:
        raise ServeError(f"{where}: {error}") from None
    ids = [cfg.bos_token_id] + tokenizer.encode(prompt)
    problem = prompt_problem(ids, cfg)
    if problem:
        raise ServeError(f"{where}: the prompt {problem}")
    return Request(request_id, prompt, ids, max_new_tokens, sampling, seed, stop)


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


def batches(requests: Iterable[Request], size: int) -> Iterator[list[Request]]:
    requests = iter(requests)
    while batch := list(itertools.islice(requests, size)):
        yield batch


def generate(generator: Generator, batch: Sequence[Request], tokenizer: Tokenizer) -> tuple[list[Completion],
                                                                                            GenerationStats]:
    """One batch, each request with its own settings (see Generator.generate)."""
    return generator.generate([r.token_ids for r in batch], [r.max_new_tokens for r in batch],
                              [r.sampling for r in batch], [r.seed for r in batch], [r.stop for r in batch],
                              detokenize=tokenizer.decode)


FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "context_window": "length"}


def result(request: Request, completion: Completion) -> dict:
    """A request's result row; prompt + completion is the text of all the token ids."""
    row = dict(prompt=request.prompt) if request.id is None else dict(id=request.id)
    return dict(**row, completion=completion.text, finish_reason=FINISH_REASONS[completion.stop_reason],
                stop_reason=completion.stop_reason, prompt_tokens=len(request.token_ids),
                num_tokens=len(completion.token_ids), token_ids=completion.token_ids)


def add_stats(total: GenerationStats, stats: GenerationStats) -> None:
    for field in dataclasses.fields(GenerationStats):
        setattr(total, field.name, getattr(total, field.name) + getattr(stats, field.name))


def summary(prompts: int, stats: GenerationStats, seconds: float) -> str:
    rate = lambda tokens, seconds: round(tokens / seconds, 1) if seconds > 0 else None  # noqa: E731
    return json.dumps(dict(summary=dict(
        prompts=prompts, prefill_tokens=stats.prefill_tokens, prefill_seconds=round(stats.prefill_seconds, 4),
        prefill_tokens_per_s=rate(stats.prefill_tokens, stats.prefill_seconds),
        decode_tokens=stats.decode_tokens, decode_seconds=round(stats.decode_seconds, 4),
        decode_tokens_per_s=rate(stats.decode_tokens, stats.decode_seconds),
        compile_seconds=round(stats.compile_seconds, 2), total_seconds=round(seconds, 2))))


def serve(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO | None = None) -> None:
    began, stderr = time.perf_counter(), stderr or sys.stderr
    defaults = default_settings(args)
    if args.input and (args.prompts or args.prompts_file):
        raise ServeError("give either --input FILE (JSONL requests) or prompts, not both")
    if args.output and not args.input:
        raise ServeError("--output goes with --input FILE (plain prompts are written to stdout)")
    if args.input:
        input_path = pathlib.Path(args.input)
        if not input_path.is_file():
            raise ServeError(f"input file {input_path} does not exist")
        check_output(args.output, input_path)
    else:
        prompts = read_prompts(args, stdin)
    directory = resolve_checkpoint(args.checkpoint)
    cfg = load_config(directory)
    tokenizer = load_tokenizer(directory, cfg)
    # Every request is checked before the weights are read. A JSONL file is read twice (checked, then
    # generated from, batch by batch) rather than held whole.
    if args.input:
        requests = lambda: jsonl_requests(input_path, defaults, args.seed, tokenizer, cfg)  # noqa: E731
        count = sum(1 for _ in requests())
        if count == 0:
            raise ServeError(f"no requests in {input_path}: every line is blank")
    else:
        prepared = plain_requests(prompts, defaults, args.seed, tokenizer, cfg)
        requests, count = lambda: prepared, len(prepared)  # noqa: E731
    if args.mesh:
        mesh = make_mesh(args.mesh)
    else:  # several processes decode one batch together: it is split over all of their devices
        mesh = make_mesh(f"data={jax.device_count()}") if jax.process_count() > 1 else None
    generator = Generator(load_model(directory, mesh=mesh), vocab_limit=tokenizer.get_piece_size(), mesh=mesh)
    writer = jax.process_index() == 0  # every process decodes, one writes
    total, done, rows = GenerationStats(), 0, []
    output = open(args.output, "w", encoding="utf-8") if writer and args.output else contextlib.nullcontext(stdout)
    with output as out:
        for batch in batches(requests(), args.batch_size):
            completions, stats = generate(generator, batch, tokenizer)
            add_stats(total, stats)
            done += len(batch)
            lines = [json.dumps(result(r, c), ensure_ascii=False) for r, c in zip(batch, completions)]
            if not args.input:
                rows += lines  # plain prompts: written once all are done, the summary last
            elif writer:
                out.write("".join(line + "\n" for line in lines))
                out.flush()
                print(f"serve.py: {done}/{count} requests done", file=stderr, flush=True)
        if writer and not args.input:
            out.write("\n".join([*rows, summary(count, total, time.perf_counter() - began)]) + "\n")
            out.flush()
    if writer and args.input:
        print(summary(count, total, time.perf_counter() - began), file=stderr, flush=True)


def check_output(output: str | None, input_path: pathlib.Path) -> None:
    """An output that can be written and is not the input, before anything is generated."""
    if output is None:
        return
    path = pathlib.Path(output)
    if path.exists() and path.resolve() == input_path.resolve():
        raise ServeError(f"--output {path} is the input file")
    if path.is_dir():
        raise ServeError(f"--output {path} is a directory")
    if not path.parent.is_dir():
        raise ServeError(f"--output {path}: directory {path.parent} does not exist")


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
        written = (f"{args.output or 'stdout'} holds the results of the finished batches" if args.input
                   else "nothing was written")
        raise SystemExit(f"serve.py: interrupted; {written}") from None
    except BaseException:
        if jax.process_count() > 1:
            traceback.print_exc()
            exit_at_once_if_distributed(1)
        raise


if __name__ == "__main__":
    main()
