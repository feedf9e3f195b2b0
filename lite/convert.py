"""Convert Hugging Face LongCat-Flash(-Lite) checkpoints to the project's format and back, streaming.

    python -m lite.convert --from-hf HF_DIR --out OUR_DIR     # config.json + model.safetensors(.index.json)
    python -m lite.convert --to-hf OUR_DIR --out HF_DIR [--max-shard-size 5GB]

Our format is lite/checkpoint.py's (what train.py and serve.py load with `load_model`): a
`model.safetensors` (several files + index above 5 GB) whose tensors stack layers and experts on leading
axes; `load_model` also reads a Hugging Face directory directly, without conversion. Conversion never holds
a whole tensor of either side: the output header is computed from shapes first, then each output
tensor is written front to back, piece by piece (one HF tensor per layer / expert / N-gram
sub-table), large pieces in row chunks read through safetensors' memory map. Peak memory is
therefore about one chunk plus whatever pages of the input the OS keeps mapped, independent of
the checkpoint size (README, "Hugging Face checkpoints"). Outputs are written atomically.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import pathlib
import shutil
import sys
from typing import Callable

import numpy as np

from lite import hf as hf_lib
from lite.checkpoint import (CHUNK_BYTES, CONFIG_FILE, INDEX_FILE, MAX_FILE_BYTES, CheckpointError, SafetensorsDir,
                             TensorPlan, atomic_directory, check_layout, check_tensor_names, config_to_dict,
                             load_config, piece_shape, state_shapes, write_safetensors_files)
from lite.config import ConfigError, ModelConfig
from lite.data import HF_TOKENIZER_CONFIG_FILE, DataError, hf_tokenizer_config, load_tokenizer, tokenizer_files

# Small non-weight files carried along both ways (tokenizer, generation defaults).
CARRIED_FILES = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.model", "*.tiktoken",
                 "vocab*", "merges.txt")

# ---------------------------------------------------------------------------------------------
# Streaming one tensor's pieces.

def _copy_rows(read: Callable[[slice], np.ndarray], rows: int, row_bytes: int, transform, emit) -> None:
    """Emit transform(read(r0:r1)) for consecutive row ranges of at most CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for r0 in range(0, max(rows, 1), step):
        emit(transform(read(slice(r0, min(r0 + step, rows)))))


def _emit_piece(source: SafetensorsDir, name: str, index: tuple, transpose: bool, emit) -> None:
    """Emit source[name][index] (transposed when asked) in row chunks.

    `index` is leading integers, optionally ending in a row slice (the N-gram sub-tables).
    """
    shape = list(source.shape(name))
    integers = tuple(i for i in index if not isinstance(i, slice))
    rows_slice = index[-1] if index and isinstance(index[-1], slice) else None
    piece = shape[len(integers):]
    first = 0
    if rows_slice is not None:
        first, stop, _ = rows_slice.indices(piece[0])
        piece[0] = stop - first
    itemsize = source.dtype(name).itemsize
    if len(piece) <= 1:
        emit(source.read(name, index))
    elif not transpose:  # output rows are source rows
        _copy_rows(lambda r: source.read(name, integers + (slice(first + r.start, first + r.stop),)),
                   piece[0], math.prod(piece[1:]) * itemsize, lambda a: a, emit)
    else:  # output rows are source columns: out[r0:r1] = src[:, r0:r1].T
        assert len(piece) == 2 and rows_slice is None
        _copy_rows(lambda r: source.read(name, integers + (slice(None), r)), piece[1], piece[0] * itemsize,
                   lambda a: a.T, emit)


# ---------------------------------------------------------------------------------------------
# Hugging Face -> ours.

def _check_layout(layout: dict, shapes: dict) -> None:
    if set(layout) != set(shapes):  # a model change without a matching key mapping
        raise AssertionError(f"lite.hf.tensor_layout is out of date: unmapped model tensors "
                             f"{sorted(set(shapes) - set(layout))}, stale entries {sorted(set(layout) - set(shapes))}")


def _carry_files(source: pathlib.Path, target: pathlib.Path) -> None:
    for pattern in CARRIED_FILES:
        for path in source.glob(pattern):
            if path.is_file() and path.name not in (CONFIG_FILE, INDEX_FILE) and path.suffix != ".safetensors":
                shutil.copyfile(path, target / path.name)


def _write_generation_files(cfg: ModelConfig, directory: pathlib.Path) -> None:
    """generation_config.json and tokenizer_config.json, where the source brought none (train.py's
    checkpoints carry only tokenizer.model): transformers reads the special tokens from them."""
    if not (directory / "generation_config.json").exists():
        (directory / "generation_config.json").write_text(json.dumps(hf_lib.generation_config(cfg), indent=2))
    if tokenizer_files(directory) and not (directory / HF_TOKENIZER_CONFIG_FILE).exists():
        config = hf_tokenizer_config(load_tokenizer(directory), cfg)
        (directory / HF_TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _progress_printer(total: int, label: str, quiet: bool) -> Callable[[int], None]:
    done, shown = [0], [0]

    def report(nbytes: int) -> None:
        done[0] += nbytes
        if not quiet and (done[0] - shown[0] >= max(total // 20, 1) or done[0] == total):
            shown[0] = done[0]
            print(f"{label}: {done[0] / 2**30:.2f} / {total / 2**30:.2f} GiB", file=sys.stderr, flush=True)

    return report


def check_out_dir(source: pathlib.Path, out: pathlib.Path, hf: bool) -> None:
    """`out` is replaced whole, so it must be absent, empty or a checkpoint of the kind written (`hf`: a
    Hugging Face one, else ours) holding nothing else, and must not be (or contain, or lie inside) the input."""
    kind = "Hugging Face" if hf else "lite"
    a, b = source.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise CheckpointError(f"--out {out} is the input checkpoint {source} or overlaps it; write to another directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a directory")
    entries = sorted(out.iterdir())
    if not entries:
        return
    strays = [p.name for p in entries if not (p.is_file() and _is_checkpoint_file(p.name))]
    if strays:
        raise CheckpointError(f"--out {out} holds {strays[:5]}, which are not part of a {kind} checkpoint; it would be "
                              "replaced whole: pass an absent or empty directory")
    try:
        config = json.loads((out / CONFIG_FILE).read_text())
        same_kind = (isinstance(config, dict) and config.get("model_type") in (hf_lib.MODEL_TYPE_PLAIN, hf_lib.MODEL_TYPE_NGRAM)) == hf
        if not hf:
            load_config(out)
    except (OSError, ValueError):  # no config.json, not JSON, not our config (CheckpointError is a ValueError)
        same_kind = False
    if not same_kind:
        raise CheckpointError(f"--out {out} is not empty and not a {kind} checkpoint; it would be replaced whole: pass "
                              "an absent or empty directory, or an earlier output of the same conversion")


def _is_checkpoint_file(name: str) -> bool:
    return (name in (CONFIG_FILE, INDEX_FILE) or name.endswith(".safetensors")
            or any(fnmatch.fnmatch(name, pattern) for pattern in CARRIED_FILES))


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no Hugging Face checkpoint at {directory}: {CONFIG_FILE} is missing")
    return json.loads(path.read_text())


def from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, quiet: bool = True,
            **config_overrides) -> ModelConfig:
    """Convert a Hugging Face checkpoint directory into our format at `out_dir`; returns the config."""
    hf_dir = pathlib.Path(hf_dir)
    check_out_dir(hf_dir, pathlib.Path(out_dir), hf=False)
    cfg = hf_lib.config_from_hf(read_hf_config(hf_dir), **config_overrides)
    shapes = state_shapes(cfg)
    layout = hf_lib.tensor_layout(cfg)
    _check_layout(layout, shapes)
    source = SafetensorsDir(hf_dir)
    check_layout(source, layout, shapes, lambda key: hf_lib.is_ignored_hf_key(key, cfg), "Hugging Face checkpoint")

    plans = []
    for name in sorted(layout):
        pieces = layout[name]
        dtypes = {source.dtype(p.hf_key) for p in pieces}
        # Keep the checkpoint's dtype (exact round trips); mixed pieces are cast to the model's dtype.
        dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(shapes[name].dtype)

        def write(emit, name=name, pieces=pieces, dtype=dtype):
            for piece in pieces:
                _emit_piece(source, piece.hf_key, (), piece.transpose, emit)
            if name == "embed.ngram_table":  # the rows past the sub-tables: zero padding (ModelConfig.ngram_padded_rows)
                emit(np.zeros((cfg.ngram_padded_rows - cfg.ngram_total_rows, cfg.ngram_table_width), dtype))

        plans.append(TensorPlan(name, dtype, shapes[name].shape, write))
    total = sum(p.nbytes for p in plans)
    with atomic_directory(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=2))
        write_safetensors_files(tmp, plans, MAX_FILE_BYTES, {"format": "np"},
                                _progress_printer(total, f"{hf_dir} -> {out_dir}", quiet))
        _carry_files(hf_dir, tmp)
    source.release()
    return cfg


# ---------------------------------------------------------------------------------------------
# Ours -> Hugging Face.

def parse_size(text: str) -> int:
    """'5GB', '500MB', '123' -> bytes (decimal units, as transformers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _layer_order(key: str) -> tuple:
    """HF keys grouped by layer (then by name), so that a shard holds whole layers where it can."""
    parts = key.split(".")
    layer = int(parts[2]) if key.startswith("model.layers.") else (-1 if key.startswith("model.") else 1 << 30)
    return (layer, [(0, int(p)) if p.isdigit() else (1, p) for p in parts])


def to_hf(our_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_shard_bytes: int = MAX_FILE_BYTES,
          quiet: bool = True) -> dict:
    """Convert our checkpoint at `our_dir` into a Hugging Face directory; returns the HF config dict.

    A single `model.safetensors` when it fits `max_shard_bytes`, else shards plus
    `model.safetensors.index.json`. The plain model also gets zero-filled gate/up projections for
    the zero experts, which `transformers` insists on (`lite.hf.zero_expert_stubs`).
    """
    our_dir = pathlib.Path(our_dir)
    check_out_dir(our_dir, pathlib.Path(out_dir), hf=True)
    cfg = load_config(our_dir)
    hf_config = hf_lib.config_to_hf(cfg)
    shapes = state_shapes(cfg)
    layout = hf_lib.tensor_layout(cfg)
    _check_layout(layout, shapes)
    source = SafetensorsDir(our_dir)
    check_tensor_names(shapes, source.meta, f"{our_dir} does not match its config.json")
    for name, want in shapes.items():
        if source.shape(name) != tuple(want.shape):
            raise CheckpointError(f"tensor {name}: checkpoint has shape {source.shape(name)}, "
                                  f"the model expects {tuple(want.shape)}")

    plans = []
    for name, pieces in layout.items():
        for piece in pieces:
            shape = piece_shape(shapes[name].shape, piece.index, piece.transpose)
            plans.append(TensorPlan(piece.hf_key, source.dtype(name), shape,
                                    lambda emit, name=name, piece=piece:
                                    _emit_piece(source, name, piece.index, piece.transpose, emit)))
    stub_dtype = source.dtype("layers.moe.w_gate")
    for key, shape in hf_lib.zero_expert_stubs(cfg):
        plans.append(TensorPlan(key, stub_dtype, shape, lambda emit, shape=shape: emit(np.zeros(shape, stub_dtype))))
    plans.sort(key=lambda p: _layer_order(p.name))
    report = _progress_printer(sum(p.nbytes for p in plans), f"{our_dir} -> {out_dir}", quiet)
    with atomic_directory(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        write_safetensors_files(tmp, plans, max_shard_bytes, {"format": "pt"}, report)
        _carry_files(our_dir, tmp)
        _write_generation_files(cfg, tmp)
    source.release()
    return hf_config


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lite.convert", description=__doc__.split("\n\n")[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="DIR", help="a Hugging Face checkpoint directory to import")
    direction.add_argument("--to-hf", metavar="DIR", help="one of our checkpoint directories to export")
    parser.add_argument("--out", metavar="DIR", required=True,
                        help="the directory to write: absent, empty, or an earlier output of the same conversion "
                             "(replaced whole); never the input")
    parser.add_argument("--max-shard-size", default="5GB", help="--to-hf: largest safetensors shard (default 5GB)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        if args.from_hf:
            cfg = from_hf(args.from_hf, args.out, quiet=args.quiet)
            print(f"wrote {args.out}: {cfg.num_layers} layers, {'N-gram' if cfg.has_ngram else 'plain'} model")
        else:
            to_hf(args.to_hf, args.out, max_shard_bytes=parse_size(args.max_shard_size), quiet=args.quiet)
            print(f"wrote {args.out}")
    except (CheckpointError, ConfigError, DataError, OSError) as error:  # OSError: unreadable input, full disk
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
