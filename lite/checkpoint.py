"""Model checkpoints: a directory holding `config.json` and the weights in safetensors files.

Tensor names are the model's state paths joined by dots, e.g. `embed.ngram_table`,
`layers.attns.0.q_a_proj.kernel` ([num_layers, D, q_lora]) or `layers.moe.router.bias`; kernels are
stored [in, out] and per-layer tensors stacked on a leading layer axis, exactly as the model holds
them. Weights go to `model.safetensors`, or, above `max_file_bytes` (5 GB), to
`model-00001-of-0000N.safetensors` files listed in `model.safetensors.index.json` (the Hugging
Face layout). A directory is written under a temporary name and renamed into place, so a reader
never sees half a checkpoint.

Sharded state is never gathered whole: `save_model` streams each tensor in blocks of at most
CHUNK_BYTES (on several processes each block is gathered to every process and process 0 writes),
and `load_model(directory, mesh)` creates every array already sharded by sharding.rules, each
device's slice read from the memory-mapped files (only the bytes it holds), one slice at a time. The same load reads a
Hugging Face checkpoint directory through lite.hf's key map (stacking by layer and expert,
transposes), with no converted copy on disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import struct
import sys
import tempfile
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, SingleDeviceSharding

from lite import hf as hf_lib
from lite.config import ConfigError, ModelConfig, YarnScaling, check_field_names
from lite.model import LongcatModel, abstract_model
from sharding.rules import logical_to_spec, variable_axes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_FILE_BYTES = 5 * 10**9  # one safetensors file of a checkpoint, as transformers' max_shard_size
CHUNK_BYTES = 64 << 20  # the most one streamed read or write block holds in host memory

_DTYPE_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
                np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
                np.dtype(np.bool_): "BOOL"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model; the message says which and why."""


def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    """The inverse of config_to_dict: every field must be present (a missing one is not defaulted: the
    model it describes would silently differ from the one that was saved)."""
    if not isinstance(d, dict):
        raise ConfigError(f"a model config must be a JSON object of ModelConfig fields, got {type(d).__name__}")
    d = dict(d)
    check_field_names(d)
    missing = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in d]
    if missing:
        raise ConfigError(f"the model config lacks {len(missing)} field(s): {', '.join(missing[:6])}"
                          f"{' ...' if len(missing) > 6 else ''}")
    if d["rope_scaling"] is not None:
        if not isinstance(d["rope_scaling"], dict):
            raise ConfigError(f"rope_scaling must be an object or null, got {d['rope_scaling']!r}")
        try:
            d["rope_scaling"] = YarnScaling(**d["rope_scaling"])
        except TypeError as error:
            raise ConfigError(f"rope_scaling: {error}") from error
    return ModelConfig(**d)


def check_tensor_names(expected, present, problem: str) -> None:
    """CheckpointError "<problem>: missing tensors [...], unexpected tensors [...]" unless the two
    name sets are equal (the first 8 of each shown)."""
    missing, unexpected = sorted(set(expected) - set(present)), sorted(set(present) - set(expected))
    if missing or unexpected:
        def some(names):
            return f"{names[:8]}{' ...' if len(names) > 8 else ''}"

        raise CheckpointError(f"{problem}: missing tensors {some(missing)}, unexpected tensors {some(unexpected)}")


def model_state_arrays(model: nnx.Module) -> dict[str, jax.Array]:
    """Every variable of the model (parameters and the router bias) by dotted path."""
    return {".".join(map(str, path)): leaf[...] for path, leaf in nnx.to_flat_state(nnx.state(model))}


def state_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Every tensor of a checkpoint of this config, by name, with its shape and dtype (nothing allocated)."""
    return {".".join(map(str, path)): jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
            for path, leaf in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}


def model_from_arrays(cfg: ModelConfig, arrays: dict[str, np.ndarray]) -> LongcatModel:
    """Build a model from named arrays; every name must be present with the model's shape."""
    graphdef, state = nnx.split(abstract_model(cfg))
    flat = nnx.to_flat_state(state)
    expected = {".".join(map(str, path)) for path, _ in flat}
    check_tensor_names(expected, arrays, "checkpoint does not match the model config")
    for path, leaf in flat:
        name = ".".join(map(str, path))
        value = arrays[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointError(f"tensor {name}: checkpoint has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(leaf.shape)}")
        leaf.set_value(jnp.asarray(value, dtype=leaf.dtype))  # the model's dtype wins
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---------------------------------------------------------------------------------------------
# safetensors files: headers, streamed writes, memory-mapped reads.

def read_header(path: pathlib.Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data) of a safetensors file,
    every entry checked against the file: a broken file is one CheckpointError naming it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise CheckpointError(f"{path} is corrupt or unreadable: header length {length} exceeds the file size")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path} is corrupt or unreadable: malformed header ({error})") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt or unreadable: the header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + length
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = _DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path} is corrupt or unreadable: tensor {name} has a malformed entry "
                                  f"{entry!r} ({type(error).__name__}: {error})") from error
        if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= size - data_start:
            raise CheckpointError(f"{path} is corrupt or unreadable: tensor {name} {entry['dtype']}{list(shape)} "
                                  f"has data offsets [{begin}, {end}] that do not fit it or the file")
    return header, data_start


class SafetensorsDir:
    """The tensors of `model.safetensors` or of the files listed in `model.safetensors.index.json`.

    `read` goes through `safetensors.safe_open` (memory-mapped), closing the files again after every
    CHUNK_BYTES read so that the mapped pages read so far stop counting against this process;
    `read_region` maps just one tensor's bytes with NumPy, copies the region out and unmaps.
    """

    def __init__(self, directory: pathlib.Path):
        from safetensors import safe_open

        directory = pathlib.Path(directory)
        self._safe_open = safe_open
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
                if not all(isinstance(name, str) for name in files):
                    raise TypeError("file names must be strings")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise CheckpointError(f"{index} is not a valid safetensors index (a JSON object with a "
                                      f"weight_map of tensor -> file): {type(error).__name__}: {error}") from error
        elif (directory / WEIGHTS_FILE).is_file():
            files, weight_map = [WEIGHTS_FILE], None
        else:
            raise CheckpointError(f"no safetensors weights in {directory}: expected {WEIGHTS_FILE} or {INDEX_FILE}")
        self.files = [directory / name for name in files]
        self.meta: dict[str, tuple[pathlib.Path, np.dtype, tuple[int, ...]]] = {}
        self._offsets: dict[str, int] = {}
        for path in self.files:
            if not path.is_file():
                raise CheckpointError(f"{path.name} is listed in {INDEX_FILE} but missing from {directory}")
            header, data_start = read_header(path)
            for name, entry in header.items():
                if name in self.meta:
                    raise CheckpointError(f"tensor {name} appears in both {self.meta[name][0].name} and {path.name}")
                self.meta[name] = (path, _DTYPES[entry["dtype"]], tuple(entry["shape"]))
                self._offsets[name] = data_start + entry["data_offsets"][0]
        if weight_map is not None:
            misplaced = sorted(name for name, file in weight_map.items()
                               if name not in self.meta or self.meta[name][0].name != file)
            if misplaced:
                raise CheckpointError(f"{index} lists tensors that are not in the file it names: {misplaced[:8]}")
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

    def read_region(self, name: str, region: tuple[slice, ...]) -> np.ndarray:
        """A copy of tensor[region] (one slice per dimension); only the pages holding it are read."""
        path, dtype, shape = self.meta[name]
        if not math.prod(shape):
            return np.zeros(shape, dtype)[region]
        mapped = np.memmap(path, dtype=dtype, mode="r", offset=self._offsets[name], shape=shape)
        region_copy = np.array(mapped[region])
        del mapped  # unmapped now: the pages read stop counting as this process's memory
        return region_copy

    def release(self) -> None:
        """Unmap every file (they reopen on the next read)."""
        self._open.close()
        self._handles.clear()
        self._mapped_bytes = 0


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


def write_safetensors_files(directory: pathlib.Path, plans: list[TensorPlan], max_file_bytes: int,
                            metadata: dict[str, str] | None = None,
                            progress: Callable[[int], None] = lambda nbytes: None) -> None:
    """`model.safetensors` when everything fits `max_file_bytes`, else consecutive files of at most
    that size (a larger tensor gets a file of its own) named model-0000i-of-0000N.safetensors,
    with `model.safetensors.index.json` (total_size, weight_map) as transformers writes them."""
    files: list[list[TensorPlan]] = [[]]
    for plan in plans:
        if files[-1] and sum(p.nbytes for p in files[-1]) + plan.nbytes > max_file_bytes:
            files.append([])
        files[-1].append(plan)
    if len(files) == 1:
        write_safetensors(directory / WEIGHTS_FILE, files[0], metadata, progress)
        return
    weight_map = {}
    for i, file_plans in enumerate(files):
        file_name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        write_safetensors(directory / file_name, file_plans, metadata, progress)
        weight_map.update({plan.name: file_name for plan in file_plans})
    (directory / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": sum(p.nbytes for p in plans)}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2))


# ---------------------------------------------------------------------------------------------
# Saving.

def _blocks(shape: tuple[int, ...], itemsize: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(start, size) blocks that tile a tensor in C order, each at most CHUNK_BYTES (or one row of
    its last dimension): whole trailing dimensions, a run of indices of one dimension, leading
    indices fixed."""
    if not shape or math.prod(shape) * itemsize <= CHUNK_BYTES:
        yield (0,) * len(shape), tuple(shape)
        return
    inner = math.prod(shape[1:]) * itemsize
    if inner <= CHUNK_BYTES or len(shape) == 1:
        step = max(1, CHUNK_BYTES // max(inner, 1))
        for r in range(0, shape[0], step):
            yield (r,) + (0,) * (len(shape) - 1), (min(step, shape[0] - r),) + tuple(shape[1:])
        return
    for r in range(shape[0]):
        for start, size in _blocks(shape[1:], itemsize):
            yield (r,) + start, (1,) + size


@functools.partial(jax.jit, static_argnums=2)
def _block(array: jax.Array, start: tuple, size: tuple) -> jax.Array:
    return jax.lax.dynamic_slice(array, start, size)  # one compilation per tensor and block size


def _host_block(array: jax.Array, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """array[start : start + size] on this host; gathered from every process when it spans several."""
    block = _block(array, tuple(np.int32(i) for i in start), size) if size != array.shape else array
    if block.is_fully_addressable:
        return np.asarray(block)
    return np.asarray(multihost_utils.process_allgather(block, tiled=True))


def _stream_array(array: jax.Array, emit: Callable[[np.ndarray], None]) -> None:
    for start, size in _blocks(tuple(array.shape), array.dtype.itemsize):
        emit(_host_block(array, start, size))


def save_model(model: LongcatModel, directory: str | os.PathLike, extra_files: dict[str, str] | None = None,
               max_file_bytes: int = MAX_FILE_BYTES) -> None:
    """Write config.json + the weights (+ extra files, e.g. the tokenizer) atomically.

    Works on sharded models and on several processes: every process must call it (the blocks of
    arrays that span processes are gathered collectively, at most CHUNK_BYTES at a time); process 0
    writes the directory, which the others can read once it returns on every process.
    """
    plans = [TensorPlan(name, np.dtype(array.dtype), array.shape, functools.partial(_stream_array, array))
             for name, array in model_state_arrays(model).items()]
    if jax.process_index() == 0:
        with atomic_directory(directory) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(model.cfg), indent=2))
            write_safetensors_files(tmp, plans, max_file_bytes, {"format": "np"})
            for name, source in (extra_files or {}).items():
                shutil.copyfile(source, tmp / name)
    else:
        for plan in plans:  # the same collectives as process 0, nothing written
            plan.write(lambda block: None)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_model {directory}")


def file_sha256(path: pathlib.Path) -> str:
    """The sha256 of a file's bytes, read in blocks (checkpoint and token-cache files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary directory beside `directory`; on success it replaces `directory` whole,
    on failure it is removed, so a reader never sees half a checkpoint.

    The replacement is one atomic exchange of the two names (Linux renameat2 RENAME_EXCHANGE): at
    every moment `directory` is the old or the new one, never absent. Where the file system cannot
    exchange, the old one is renamed aside first (a short window without `directory`). Files and
    folders get the modes the umask gives (not mkdtemp's private 0700), so that others can read
    them. Temporary folders a killed writer left beside `directory` are removed on the next write.
    """
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(directory)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{os.getpid()}-", dir=directory.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if not directory.exists():
            tmp.rename(directory)
        elif _exchange(tmp, directory):
            shutil.rmtree(tmp)  # now the old directory
        else:
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}")
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap two paths atomically; False where the OS or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _apply_umask(root: pathlib.Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _remove_abandoned(directory: pathlib.Path) -> None:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID-*` folders whose writer process no longer runs."""
    for path in directory.parent.glob(f".{directory.name}.*-*-*"):
        kind, _, rest = path.name[len(directory.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _process_runs(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Loading.

def _read_config_json(directory: pathlib.Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {directory}: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not a valid model config: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a valid model config: not a JSON object")
    return config


def is_hf_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether config.json is a Hugging Face config (rather than ours)."""
    return hf_lib.looks_like_hf_config(_read_config_json(pathlib.Path(directory)))


def load_config(directory: str | os.PathLike) -> ModelConfig:
    """The model config of one of our checkpoints or of a Hugging Face checkpoint directory."""
    path = pathlib.Path(directory) / CONFIG_FILE
    config = _read_config_json(pathlib.Path(directory))
    try:
        return hf_lib.config_from_hf(config) if hf_lib.looks_like_hf_config(config) else config_from_dict(config)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{path} is not a valid model config: {error}") from error


def piece_shape(full: tuple[int, ...], index: tuple, transpose: bool) -> tuple[int, ...]:
    """The stored shape of the piece ours[index] (transposed when asked), from our tensor's shape."""
    integers = sum(1 for i in index if not isinstance(i, slice))
    shape = list(full[integers:])
    if index and isinstance(index[-1], slice):
        start, stop, _ = index[-1].indices(shape[0])
        shape[0] = stop - start
    return tuple(reversed(shape)) if transpose else tuple(shape)


def checkpoint_layout(directory: str | os.PathLike, cfg: ModelConfig) -> tuple[dict[str, list[hf_lib.Piece]], Callable]:
    """For each of our tensors, the stored tensors it is made of, and which stored keys to ignore:
    ours map one to one; a Hugging Face directory through lite.hf.tensor_layout."""
    if is_hf_checkpoint(directory):
        return hf_lib.tensor_layout(cfg), lambda key: hf_lib.is_ignored_hf_key(key, cfg)
    return {name: [hf_lib.Piece(name, (), False)] for name in state_shapes(cfg)}, lambda key: False


def check_layout(source: SafetensorsDir, layout: dict[str, list[hf_lib.Piece]], shapes: dict,
                 ignored: Callable[[str], bool], what: str) -> None:
    """Every stored tensor of the layout present with the right shape and a float dtype where the
    model's tensor is float, nothing else (ignored keys aside)."""
    expected = {piece.hf_key: (name, piece) for name, pieces in layout.items() for piece in pieces}
    present = {key for key in source.meta if not ignored(key)}
    check_tensor_names(expected, present, f"{what} does not match its config.json")
    for key, (name, piece) in expected.items():
        want = piece_shape(shapes[name].shape, piece.index, piece.transpose)
        if source.shape(key) != want:
            raise CheckpointError(f"tensor {key}: checkpoint has shape {source.shape(key)}, the model expects {want}")
        stored, model = source.dtype(key), np.dtype(shapes[name].dtype)
        if np.issubdtype(model, np.inexact) and not np.issubdtype(stored, np.inexact):
            raise CheckpointError(f"{source.meta[key][0]}: tensor {key} holds {stored} values, but the model's "
                                  f"{name} is {model}")


def _normalize(region: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    region = tuple(region) + (slice(None),) * (len(shape) - len(region))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, shape))


def read_region(source: SafetensorsDir, pieces: list[hf_lib.Piece], shape: tuple[int, ...], dtype: np.dtype,
                region: tuple) -> np.ndarray:
    """ours[region] of the tensor the pieces make up, as `dtype`: each overlapping piece's part read
    from its file (transposed where stored torch-style), nothing else. What no piece covers is zero:
    the N-gram table's padding rows (ModelConfig.ngram_padded_rows), which Hugging Face does not store."""
    region = _normalize(region, shape)
    if len(pieces) == 1 and not pieces[0].index and not pieces[0].transpose:  # stored as is: no assembly copy
        return source.read_region(pieces[0].hf_key, region).astype(dtype, copy=False)
    out = np.zeros(tuple(s.stop - s.start for s in region), dtype)
    for piece in pieces:
        out_index, stored = [], []  # where the piece's part goes in `out`; its leading stored dims
        for dim, entry in enumerate(piece.index):
            want = region[dim]
            if isinstance(entry, slice):  # a row range of our tensor: a dimension the stored tensor keeps
                lo, hi = max(entry.start, want.start), min(entry.stop, want.stop)
                if lo >= hi:
                    break
                out_index.append(slice(lo - want.start, hi - want.start))
                stored.append(slice(lo - entry.start, hi - entry.start))
            elif want.start <= entry < want.stop:  # a layer / expert index: a dimension it does not have
                out_index.append(entry - want.start)
            else:
                break
        else:
            rest = list(region[len(piece.index):])
            stored += rest
            data = source.read_region(piece.hf_key, tuple(stored[::-1] if piece.transpose else stored))
            out[tuple(out_index) + (slice(None),) * len(rest)] = data.T if piece.transpose else data
    return out


def sharded_array(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
                  read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array of `shape` laid out by `sharding`, this process's devices filled by `read(region)`
    one distinct region at a time (jax.make_array_from_callback would hold every device's slice in
    host memory at once): a replicated region is read once and copied to each device holding it."""
    regions: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        region = _normalize(index, shape)
        regions.setdefault(tuple((s.start, s.stop) for s in region), []).append(device)
    buffers = {}
    for key, devices in regions.items():
        host = read(tuple(slice(*bounds) for bounds in key))
        for device in devices:
            buffers[device] = jax.device_put(host, device)
        del host
    ordered = [buffers[device] for device in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, ordered)


def load_model(directory: str | os.PathLike, mesh: jax.sharding.Mesh | None = None) -> LongcatModel:
    """Read a checkpoint written by `save_model` or conversion, or a Hugging Face checkpoint directory.

    Without a mesh every array lands on the default device; with one, each is created already
    sharded by sharding.rules, every device's slice read straight from the memory-mapped files
    (`sharded_array`), so no process holds more than its devices' slices plus one slice in flight.
    On several processes every process reads only for its own devices.
    The model's dtype wins over the stored one (float weights are cast).
    """
    directory = pathlib.Path(directory)
    cfg = load_config(directory)
    source = SafetensorsDir(directory)
    layout, ignored = checkpoint_layout(directory, cfg)
    graphdef, state = nnx.split(abstract_model(cfg))
    flat = nnx.to_flat_state(state)
    shapes = {".".join(map(str, path)): leaf for path, leaf in flat}
    if set(layout) != set(shapes):  # a model change without a matching key mapping
        raise AssertionError(f"lite.hf.tensor_layout is out of date: {sorted(set(shapes) ^ set(layout))}")
    check_layout(source, layout, shapes, ignored, str(directory))
    try:
        for path, leaf in flat:
            name, shape, dtype = ".".join(map(str, path)), tuple(leaf.shape), np.dtype(leaf.dtype)
            sharding = (SingleDeviceSharding(jax.devices()[0]) if mesh is None else
                        NamedSharding(mesh, logical_to_spec(variable_axes(path, leaf), shape, mesh)))
            leaf.set_value(sharded_array(shape, sharding,
                                         functools.partial(read_region, source, layout[name], shape, dtype)))
    finally:
        source.release()
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
