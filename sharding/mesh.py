"""Meshes from a spec string: `data=2,expert=4`, `fsdp=16,expert=8`, `expert=8`.

Axes (any subset, in this order; omitted axes have size 1 and are left out of the mesh):
    data    pure data parallelism: the batch is split, parameters are replicated
    fsdp    the batch is split and the dense weights' model dimension is split too (ZeRO-3 style:
            XLA gathers a weight where it is used and reduce-scatters its gradient)
    expert  the batch is split and the MoE experts are split (expert parallelism inside shard_map)
Every axis splits the batch, so the global batch must be divisible by the number of devices. The
N-gram table's rows are split over as many of the axes as divide its row count (sharding.rules).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert")


class MeshSpecError(ValueError):
    """A mesh spec string is malformed or does not match the available devices."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`data=2,expert=4` -> {"data": 2, "expert": 4} in MESH_AXES order (sizes >= 1)."""
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise MeshSpecError(f"mesh spec {spec!r}: {part!r} is not AXIS=SIZE with AXIS one of {MESH_AXES}")
        if name in sizes:
            raise MeshSpecError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise MeshSpecError(f"mesh spec {spec!r}: size of {name!r} must be a positive integer, got {value!r}")
        sizes[name] = size
    if not sizes:
        raise MeshSpecError(f"mesh spec {spec!r} names no axis; example: 'data=2,expert=4'")
    return {name: sizes[name] for name in MESH_AXES if name in sizes}


def make_mesh(spec: str | dict[str, int], devices: Sequence | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with Auto axis types, so XLA propagates shardings
    between the explicitly placed parameters/inputs and the shard_map boundaries."""
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(sizes.values())
    if needed != len(devices):
        raise MeshSpecError(f"mesh {sizes} needs {needed} devices, but {len(devices)} are available "
                            f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={needed})")
    names = tuple(sizes)
    try:  # a topology-aware device order where JAX knows one (TPU slices), else the given order
        array = mesh_utils.create_device_mesh(tuple(sizes.values()), devices)
    except Exception:  # noqa: BLE001 - fake CPU devices and abstract topologies have no physical layout
        array = np.asarray(devices, dtype=object).reshape(tuple(sizes.values()))
    return Mesh(array, names, axis_types=(AxisType.Auto,) * len(names))


def batch_axes(mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch (all of them, see the module docstring)."""
    return tuple(name for name in MESH_AXES if name in mesh.axis_names)


def axis_size(mesh, name: str) -> int:
    return dict(mesh.shape).get(name, 1) if mesh is not None and not mesh.empty else 1


def active_mesh():
    """The ambient mesh set with `jax.set_mesh`, or None when there is none or it has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:  # manual axes: already inside a shard_map
        return None
    if not set(mesh.axis_names) <= set(MESH_AXES):
        raise MeshSpecError(f"mesh axes {mesh.axis_names} are not all among {MESH_AXES}; build the mesh "
                            "with sharding.make_mesh")
    return mesh


def initialize_distributed(force: bool = False, coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """`jax.distributed.initialize` for multi-process runs; nothing on one process.

    By hand: `coordinator` HOST:PORT (process 0 listens there), `num_processes` and this process's
    `process_id`, all three or none. Otherwise the cluster is read from the environment (TPU VMs,
    SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS), or `force` asks JAX to detect it. Collectives
    between the CPU devices of several processes go through gloo, so a multi-process run also
    works on one machine's CPUs (the tests do that).
    """
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise MeshSpecError("--coordinator HOST:PORT, --num-processes N and --process-id I go together")
    if all(given):
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise MeshSpecError(f"--coordinator {coordinator!r} is not HOST:PORT")
        if not (num_processes >= 1 and 0 <= process_id < num_processes):
            raise MeshSpecError(f"--process-id {process_id} must lie in [0, --num-processes {num_processes})")
    env = os.environ
    multi_host = (force or all(given) or "JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
                  or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if multi_host:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)


def exit_at_once_if_distributed(code: int) -> None:
    """After a failure on a multi-process run, leave now with `code`, skipping JAX's shutdown barrier:
    waiting there for processes that wait for this one in a collective is a hang. The others see
    the connection close (gloo) or the missing heartbeats and end with an error themselves."""
    if jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
