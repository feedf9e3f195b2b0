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
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lite.config import ModelConfig, YarnScaling, check_field_names
from lite.model import LongcatModel, abstract_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model; the message says which and why."""


def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = YarnScaling(**d["rope_scaling"])
    check_field_names(d)
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
    on failure it is removed, so a reader never sees half a checkpoint."""
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_config(directory: str | os.PathLike) -> ModelConfig:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {directory}: {CONFIG_FILE} is missing")
    try:
        return config_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
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
