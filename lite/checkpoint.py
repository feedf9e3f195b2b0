"""Model checkpoints: a directory holding `config.json` and `model.safetensors`.

Tensor names are the model's state paths joined by dots, e.g. `embed.ngram_table`,
`layers.attns.0.q_a_proj.kernel` ([num_layers, D, q_lora]) or `layers.moe.router.bias`; kernels are
stored [in, out] and per-layer tensors stacked on a leading layer axis, exactly as the model holds
them. safetensors is memory-mapped on read and can be written tensor by tensor, which is what
checkpoint conversion needs. A directory is written under a temporary name and renamed into
place, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lite.config import ConfigError, ModelConfig, YarnScaling, check_field_names
from lite.model import LongcatModel, abstract_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


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


def save_model(model: LongcatModel, directory: str | os.PathLike, extra_files: dict[str, str] | None = None) -> None:
    """Write config.json + model.safetensors (+ extra files, e.g. the tokenizer) atomically."""
    from safetensors.numpy import save_file

    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(model.cfg), indent=2))
        save_file({name: np.asarray(value) for name, value in model_state_arrays(model).items()},
                  str(tmp / WEIGHTS_FILE))
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)


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


def load_config(directory: str | os.PathLike) -> ModelConfig:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {directory}: {CONFIG_FILE} is missing")
    try:
        return config_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ConfigError) as error:
        raise CheckpointError(f"{path} is not a valid model config: {error}") from error


def load_model(directory: str | os.PathLike) -> LongcatModel:
    """Read a checkpoint written by `save_model` (or by checkpoint conversion)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    cfg = load_config(directory)
    weights = pathlib.Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"no checkpoint weights at {directory}: {WEIGHTS_FILE} is missing")
    try:
        arrays = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights} is corrupt or unreadable: {error}") from error
    return model_from_arrays(cfg, arrays)
