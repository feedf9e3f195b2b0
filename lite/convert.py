"""Convert Hugging Face LongCat-Flash(-Lite) checkpoints to the project's format and back, streaming.

    python -m lite.convert --from-hf HF_DIR --out OUR_DIR     # config.json + model.safetensors(.index.json)
    python -m lite.convert --to-hf OUR_DIR --out HF_DIR [--max-shard-size 5GB]

Our format is lite/checkpoint.py's (what train.py and serve.py load with `load_model`): one
`model.safetensors` whose tensors stack layers and experts on leading axes. Conversion never holds
a whole tensor of either side: the output header is computed from shapes first, then each output
tensor is written front to back, piece by piece (one HF tensor per layer / expert / N-gram
sub-table), large pieces in row chunks read through safetensors' memory map. Peak memory is
therefore about one chunk plus whatever pages of the input the OS keeps mapped, independent of
the checkpoint size (README, "Hugging Face checkpoints"). Outputs are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import pathlib
import shutil
import struct
import sys
from typing import Callable

import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy, which safetensors' numpy reader needs
import numpy as np

from lite import hf as hf_lib
from lite.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, CheckpointError, atomic_directory, check_tensor_names, config_to_dict,
                             load_config, state_shapes)
from lite.config import ConfigError, ModelConfig

HF_INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 64 << 20  # the most a single read / write holds in memory
# Small non-weight files carried along both ways (tokenizer, generation defaults).
CARRIED_FILES = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.model", "*.tiktoken",
                 "vocab*", "merges.txt")

_DTYPE_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
                np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
                np.dtype(np.bool_): "BOOL"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


# ---------------------------------------------------------------------------------------------
# Reading: every tensor of a directory (single file or shards), memory-mapped.

class SafetensorsDir:
    """The tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`.

    Files are opened with `safetensors.safe_open` (memory-mapped) on first use and closed again
    after every CHUNK_BYTES read, so that the mapped pages read so far stop counting against this
    process: resident memory stays bounded by a few chunks whatever the checkpoint size.
    """

    def __init__(self, directory: pathlib.Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        index = directory / HF_INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / WEIGHTS_FILE).is_file():
            files = [WEIGHTS_FILE]
        else:
            raise CheckpointError(f"no safetensors weights in {directory}: expected {WEIGHTS_FILE} or {HF_INDEX_FILE}")
        self.files = [directory / name for name in files]
        self.meta: dict[str, tuple[pathlib.Path, np.dtype, tuple[int, ...]]] = {}
        for path in self.files:
            if not path.is_file():
                raise CheckpointError(f"{path.name} is listed in {HF_INDEX_FILE} but missing from {directory}")
            for name, entry in _read_header(path).items():
                if name in self.meta:
                    raise CheckpointError(f"tensor {name} appears in both {self.meta[name][0].name} and {path.name}")
                if entry["dtype"] not in _DTYPES:
                    raise CheckpointError(f"tensor {name} in {path.name} has dtype {entry['dtype']}, which is not supported")
                self.meta[name] = (path, _DTYPES[entry["dtype"]], tuple(entry["shape"]))
        self._open = contextlib.ExitStack()
        self._handles: dict[pathlib.Path, object] = {}
        self._mapped_bytes = 0

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][2]

    def dtype(self, name: str) -> np.dtype:
        return self.meta[name][1]

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """tensor[index], reading only that part of the file."""
        if self._mapped_bytes > CHUNK_BYTES:  # pages read through a map count as ours until unmapped
            self.release()
        path = self.meta[name][0]
        if path not in self._handles:
            self._handles[path] = self._open.enter_context(self._safe_open(str(path), framework="numpy"))
        tensor = self._handles[path].get_slice(name)
        if not index:  # safetensors slices need at least one index; a 0-d tensor is read whole
            array = np.asarray(tensor[:] if len(self.shape(name)) else self._handles[path].get_tensor(name))
        else:
            array = np.asarray(tensor[index])
        self._mapped_bytes += array.nbytes
        return array

    def release(self) -> None:
        """Unmap every file (they reopen on the next read)."""
        self._open.close()
        self._handles.clear()
        self._mapped_bytes = 0


def _read_header(path: pathlib.Path) -> dict:
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", prefix)
        if length > os.path.getsize(path):
            raise CheckpointError(f"{path} is corrupt: header length {length} exceeds the file size")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path} is corrupt: unreadable header ({error})") from error
    header.pop("__metadata__", None)
    return header


# ---------------------------------------------------------------------------------------------
# Writing: header from shapes first, then every tensor streamed front to back.

class TensorPlan:
    """One output tensor: its name, dtype, shape and a function that writes its bytes in order."""

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...], write: Callable[[Callable], None]):
        self.name, self.dtype, self.shape, self.write = name, np.dtype(dtype), tuple(shape), write

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: pathlib.Path, plans: list[TensorPlan], metadata: dict[str, str] | None = None,
                      progress: Callable[[int], None] = lambda nbytes: None) -> None:
    """Write a safetensors file tensor by tensor; each plan's bytes go straight to the file."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for plan in plans:
        header[plan.name] = {"dtype": _DTYPE_NAMES[plan.dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for plan in plans:
            start = f.tell()

            def emit(array: np.ndarray, plan=plan) -> None:
                data = np.ascontiguousarray(array, dtype=plan.dtype)
                f.write(data.reshape(-1).view(np.uint8).data)  # a buffer, not .tobytes(): no second copy
                progress(data.nbytes)

            plan.write(emit)
            if f.tell() - start != plan.nbytes:
                raise AssertionError(f"{plan.name}: wrote {f.tell() - start} bytes, the header says {plan.nbytes}")


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


def _piece_shape(full: tuple[int, ...], index: tuple, transpose: bool) -> tuple[int, ...]:
    """The HF shape of the piece ours[index] (transposed when asked), from our tensor's shape."""
    integers = sum(1 for i in index if not isinstance(i, slice))
    shape = list(full[integers:])
    if index and isinstance(index[-1], slice):
        start, stop, _ = index[-1].indices(shape[0])
        shape[0] = stop - start
    return tuple(reversed(shape)) if transpose else tuple(shape)


# ---------------------------------------------------------------------------------------------
# Hugging Face -> ours.

def _check_hf_keys(source: SafetensorsDir, cfg: ModelConfig, layout: dict[str, list[hf_lib.Piece]],
                   shapes: dict) -> None:
    """Every key of the layout present with the right shape, nothing else (ignored keys aside)."""
    expected = {piece.hf_key: (name, piece) for name, pieces in layout.items() for piece in pieces}
    present = {key for key in source.meta if not hf_lib.is_ignored_hf_key(key, cfg)}
    check_tensor_names(expected, present, "Hugging Face checkpoint does not match its config.json")
    for key, (name, piece) in expected.items():
        want = _piece_shape(shapes[name].shape, piece.index, piece.transpose)
        if source.shape(key) != want:
            raise CheckpointError(f"tensor {key}: checkpoint has shape {source.shape(key)}, "
                                  f"the model expects {want}")


def _check_layout(layout: dict, shapes: dict) -> None:
    if set(layout) != set(shapes):  # a model change without a matching key mapping
        raise AssertionError(f"lite.hf.tensor_layout is out of date: unmapped model tensors "
                             f"{sorted(set(shapes) - set(layout))}, stale entries {sorted(set(layout) - set(shapes))}")


def _carry_files(source: pathlib.Path, target: pathlib.Path) -> None:
    for pattern in CARRIED_FILES:
        for path in source.glob(pattern):
            if path.is_file() and path.name not in (CONFIG_FILE, HF_INDEX_FILE) and path.suffix != ".safetensors":
                shutil.copyfile(path, target / path.name)


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
    return (name in (CONFIG_FILE, HF_INDEX_FILE) or name.endswith(".safetensors")
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
    _check_hf_keys(source, cfg, layout, shapes)

    plans = []
    for name in sorted(layout):
        pieces = layout[name]
        dtypes = {source.dtype(p.hf_key) for p in pieces}
        # Keep the checkpoint's dtype (exact round trips); mixed pieces are cast to the model's dtype.
        dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(shapes[name].dtype)

        def write(emit, pieces=pieces):
            for piece in pieces:
                _emit_piece(source, piece.hf_key, (), piece.transpose, emit)

        plans.append(TensorPlan(name, dtype, shapes[name].shape, write))
    total = sum(p.nbytes for p in plans)
    with atomic_directory(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=2))
        write_safetensors(tmp / WEIGHTS_FILE, plans, {"format": "np"},
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


def to_hf(our_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 10**9,
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
            shape = _piece_shape(shapes[name].shape, piece.index, piece.transpose)
            plans.append(TensorPlan(piece.hf_key, source.dtype(name), shape,
                                    lambda emit, name=name, piece=piece:
                                    _emit_piece(source, name, piece.index, piece.transpose, emit)))
    stub_dtype = source.dtype("layers.moe.w_gate")
    for key, shape in hf_lib.zero_expert_stubs(cfg):
        plans.append(TensorPlan(key, stub_dtype, shape, lambda emit, shape=shape: emit(np.zeros(shape, stub_dtype))))
    plans.sort(key=lambda p: _layer_order(p.name))
    shards: list[list[TensorPlan]] = [[]]
    for plan in plans:
        if shards[-1] and sum(p.nbytes for p in shards[-1]) + plan.nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append(plan)
    total = sum(p.nbytes for p in plans)
    report = _progress_printer(total, f"{our_dir} -> {out_dir}", quiet)
    with atomic_directory(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        if len(shards) == 1:
            write_safetensors(tmp / WEIGHTS_FILE, shards[0], {"format": "pt"}, report)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / file_name, shard, {"format": "pt"}, report)
                weight_map.update({plan.name: file_name for plan in shard})
            (tmp / HF_INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        _carry_files(our_dir, tmp)
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
    except (CheckpointError, ConfigError, OSError) as error:  # OSError: unreadable input, full disk
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
