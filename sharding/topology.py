"""Compile-only devices for accelerator targets this machine does not have: TPU pods and H200 nodes.

    from sharding import topology
    topology.configure_environment()          # before `import jax`
    devices = topology.topology_devices("h200:1x8")   # or "v5p:2x2x2", "v6e:16x16", "h200:4x8"
    topology.set_default_device(devices)
    ... jax.jit(f).lower(*shape_dtype_structs_on_a_mesh_of(devices)).compile()
    topology.pallas_kernel_counts(compiled)   # {"ragged_matmul_gmm": 2, ..., "total": 5}

Target specs:
    TPU   any libtpu topology name, `v5e:2x2`, `v5p:2x2x2`, `v5p:4x4x8`, `v6e:16x16`, `tpu7x:2x2x1`
          (needs libtpu at the installed jax version: pip install "jax[tpu]==<jax version>")
    GPU   `h200:HOSTSxGPUS`: `h200:1x1`, `h200:1x8` (one 8-GPU node), `h200:4x8` (four nodes); the
          device is described by sharding/targets/h200_sxm.txtpb (needs the CUDA PJRT plugin at
          the installed jax version and a ptxas: pip install jax-cuda12-plugin==<v> jax-cuda12-pjrt==<v>
          absl-py nvidia-cuda-nvcc-cu12; `pip install -e ".[aot]"` installs both targets' compilers)

Self-check from the shell: `python -m sharding.topology v5e:2x2 h200:1x8` prints each target's
devices and HBM and compiles a named pair of toy kernels for it, counted back by name.

Nothing runs on these devices: lowering and `.compile()` run the real TPU compiler (libtpu) or the
real XLA:GPU compiler (LLVM -> PTX -> cubin, Triton kernels included), so memory use and kernel
compile errors show up on a CPU-only machine. This module imports no JAX at import time, so that
`configure_environment` can run before JAX starts.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import pathlib
import re
import sys

TARGETS_DIR = pathlib.Path(__file__).resolve().parent / "targets"
GPU_TARGET_FILES = {"h200": "h200_sxm.txtpb"}  # spec prefix -> GpuTargetConfigProto text file

# HBM per TPU chip in GiB, by the device kind libtpu reports (GPU sizes come from the target files).
TPU_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32,
               "TPU v6e": 32, "TPU7x": 192}

# Custom-call targets that are Pallas kernels: Mosaic TPU, Triton (Pallas' GPU lowering when given
# triton CompilerParams), Mosaic GPU, and the older jax-triton call.
PALLAS_CALL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu_v2", "mosaic_gpu",
                       "triton_kernel_call")
TOTAL = "total"


class TopologyError(ValueError):
    """A target spec is malformed, or the compiler plugin it needs is missing or mismatched."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed target spec: `platform` is "tpu" or "gpu"; GPU targets also carry their layout."""

    spec: str
    platform: str
    gpu: str | None = None  # key of GPU_TARGET_FILES
    hosts: int = 1
    per_host: int = 1

    @property
    def num_devices(self) -> int | None:
        """Known without libtpu for GPU specs; None for TPU (libtpu knows the chips per host)."""
        return self.hosts * self.per_host if self.platform == "gpu" else None


def parse_target(spec: str) -> Target:
    """`h200:1x8` -> a GPU target with 1 host x 8 GPUs; anything else is a libtpu topology name."""
    kind, sep, shape = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in GPU_TARGET_FILES:
        if not sep or not shape:
            raise TopologyError(f"target {spec!r} is neither a TPU topology like 'v5p:2x2x2' nor a GPU spec "
                                f"like {', '.join(repr(k + ':1x8') for k in GPU_TARGET_FILES)}")
        return Target(spec=spec, platform="tpu")
    match = re.fullmatch(r"(\d+)x(\d+)", shape.strip())
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise TopologyError(f"GPU target {spec!r} must be {kind}:HOSTSxGPUS_PER_HOST, e.g. {kind}:1x8 or {kind}:4x8")
    return Target(spec=spec, platform="gpu", gpu=kind, hosts=int(match[1]), per_host=int(match[2]))


# ---------------------------------------------------------------------------------------------
# Environment: read by JAX, libtpu and the CUDA plugin when they start, so set before `import jax`.

def configure_environment() -> None:
    """Make both compile-only targets work in this process; keeps values the user already set.

    JAX_PLATFORMS=cpu: without a GPU driver the CUDA plugin's start-up check fails and its topology
    is then "not implemented for cuda"; with `cpu` the plugin still compiles, and libtpu's topology
    works too. (A real accelerator host is not touched either: nothing here runs on a device.)
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 does the same for the CUDA plugin if JAX_PLATFORMS is set.
    The TPU variables let several processes load libtpu and stop it looking for a TPU VM's
    metadata server (TPU_ACCELERATOR_TYPE only silences a start-up warning; any topology compiles).
    """
    if "jax" in sys.modules:
        _configure_started_jax()
    if not os.environ.get("JAX_PLATFORMS"):
        os.environ["JAX_PLATFORMS"] = "cpu"
    for name, value in (("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                        ("TPU_ACCELERATOR_TYPE", "v5p-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TPU_SKIP_MDS_QUERY", "1")):
        os.environ.setdefault(name, value)


def _configure_started_jax() -> None:
    """JAX read JAX_PLATFORMS when imported: tell its config instead (it takes effect while no
    backend has started yet; afterwards the GPU topology may be refused, see topology_devices)."""
    import jax

    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


def check_compiler_available(target: Target) -> None:
    """Raise TopologyError naming the pip command when libtpu / the CUDA plugin is missing or not
    at the installed jax version (the plugins are built for one jax release)."""
    import jax

    version = jax.__version__
    if target.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            raise TopologyError(f"compiling for TPU target {target.spec!r} needs libtpu: "
                                f'pip install "jax[tpu]=={version}"  (or pip install -e ".[aot]")')
        return
    plugins = [name for name in ("jax-cuda12-plugin", "jax-cuda13-plugin") if _installed(name)]
    if not plugins:
        raise TopologyError(f"compiling for GPU target {target.spec!r} needs the CUDA PJRT plugin: pip install "
                            f"jax-cuda12-plugin=={version} jax-cuda12-pjrt=={version} absl-py nvidia-cuda-nvcc-cu12 "
                            '(or pip install -e ".[aot]")')
    if not any(_installed(name) == version for name in plugins):
        found = ", ".join(f"{name} {_installed(name)}" for name in plugins)
        cuda = plugins[0].split("-")[1]
        raise TopologyError(f"the CUDA plugin must match jax {version}, found {found}: pip install "
                            f"jax-{cuda}-plugin=={version} jax-{cuda}-pjrt=={version}")


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# Devices

def topology_devices(spec: str) -> list:
    """Compile-only devices of a target spec (see the module docstring), in topology order."""
    from jax.experimental import topologies

    target = parse_target(spec)
    check_compiler_available(target)
    if target.platform == "tpu":
        return list(_tpu_topology(topologies, target.spec).devices)
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target.gpu),
                                            topology=f"1x{target.hosts}x{target.per_host}")
    except NotImplementedError as error:  # the plugin started against a missing driver
        raise TopologyError(f"the CUDA plugin refused a compile-only topology ({error}): set JAX_PLATFORMS=cpu "
                            "(or call sharding.topology.configure_environment()) before JAX starts") from error
    devices = list(topo.devices)
    assert len(devices) == target.num_devices, (spec, len(devices))
    return devices


def _tpu_topology(topologies, name: str):
    """libtpu's topology; a single chip (`v5e:1x1`) also needs its host bounds spelled out."""
    dims = [int(d) for d in re.findall(r"\d+", name.partition(":")[2])]
    if dims and math.prod(dims) == 1:
        return topologies.get_topology_desc(topology_name=name, platform="tpu",
                                            chips_per_host_bounds=(1, 1, 1))
    return topologies.get_topology_desc(topology_name=name, platform="tpu")


def gpu_target_config(gpu: str) -> str:
    """The text GpuTargetConfigProto that describes one GPU of kind `gpu` (a GPU_TARGET_FILES key)."""
    return (TARGETS_DIR / GPU_TARGET_FILES[gpu]).read_text()


def set_default_device(devices) -> None:
    """Point JAX's default device at the target's first device. Pallas' TPU lowering asks the
    default device for the chip ("Unsupported TPU device kind: cpu" otherwise), Triton lowering on
    jax >= 0.11 looks for a GPU there, and pallas_kernels' kernel choice falls back to it outside a
    mesh. Process-wide: compile each target in its own process."""
    import jax

    jax.config.update("jax_default_device", devices[0])


def hbm_bytes(device) -> int:
    """Device memory of one chip: TPU kinds from TPU_HBM_GIB, GPU kinds from the target files."""
    kind = device.device_kind
    gpus = _gpu_memory_by_kind()
    if kind in gpus:
        return gpus[kind]
    for name in sorted(TPU_HBM_GIB, key=len, reverse=True):
        if kind.startswith(name):
            return TPU_HBM_GIB[name] * 2**30
    raise ValueError(f"unknown HBM size of device kind {kind!r}; known: {sorted(TPU_HBM_GIB) + sorted(gpus)}")


def _gpu_memory_by_kind() -> dict[str, int]:
    """device_description_str -> device_memory_size of every GPU target file."""
    sizes = {}
    for gpu in GPU_TARGET_FILES:
        text = gpu_target_config(gpu)
        kind = re.search(r'device_description_str:\s*"([^"]+)"', text)
        size = re.search(r"device_memory_size:\s*(\d+)", text)
        if kind and size:
            sizes[kind[1]] = int(size[1])
    return sizes


# ---------------------------------------------------------------------------------------------
# Pallas kernels in a compiled program

@dataclasses.dataclass(frozen=True)
class PallasCall:
    """One Pallas custom call of a compiled program."""

    name: str  # the `name=` given to pl.pallas_call
    target: str  # its custom-call target, one of PALLAS_CALL_TARGETS
    backward: bool  # traced in a gradient's backward pass (op_name under `transpose(...)`)


def pallas_kernel_calls(compiled) -> list[PallasCall]:
    """The Pallas custom calls of a compiled program (a `jax.stages.Compiled` or its `as_text()`).

    Call sites in the optimised HLO: a kernel inside a scanned layer stack is one call however many
    layers run it; one that XLA removed as dead code (or that fell back to XLA at trace time) is
    none. Names: a Triton call carries `name = "..."` in its backend config; Mosaic (TPU and GPU)
    calls have only their op_name metadata, `.../name/pallas_call` or, traced directly under a
    transformation, `.../transpose(jvp(name))/pallas_call` (the TPU instruction is then named
    `%transpose_jvp_name__.1`, so the instruction name is only the last resort).
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    calls = []
    for line in text.splitlines():
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target and target[1] in PALLAS_CALL_TARGETS:
            op_name = re.search(r'op_name="([^"]*)"', line)
            calls.append(PallasCall(_kernel_name(line), target[1], bool(op_name and "transpose(" in op_name[1])))
    return calls


def pallas_kernel_counts(compiled) -> dict[str, int]:
    """Kernel name -> number of its custom calls in the compiled program (see pallas_kernel_calls),
    sorted by name, plus TOTAL: the number of Pallas calls of any name."""
    calls = pallas_kernel_calls(compiled)
    counts = {name: sum(c.name == name for c in calls) for name in sorted({c.name for c in calls})}
    counts[TOTAL] = len(calls)
    return counts


def _kernel_name(line: str) -> str:
    """The kernel name of one Pallas custom-call line of HLO text (see pallas_kernel_calls)."""
    triton = re.search(r'[{,]\s*name\s*=\s*"([^"\\]+)"', line)
    if triton:
        return triton[1]
    op_name = re.search(r'op_name="(?:[^"]*/)?([^"/]+)/pallas_call"', line)
    if op_name:
        name = op_name[1]
        while wrapped := re.fullmatch(r"[\w\-]+\((.+)\)", name):  # transpose(jvp(name)) -> name
            name = wrapped[1]
        return name
    instruction = re.match(r'\s*(?:ROOT\s+)?%?([\w\-.]+)\s*=', line)
    return re.sub(r"(\.clone|\.\d+)+$", "", instruction[1]) if instruction else "unnamed"


def describe_pallas_calls(compiled) -> str:
    """One line for a report: `ngram_gather x1, ragged_matmul_gmm x6 (3 backward); 7 calls to
    tpu_custom_call`, or `none` when the program has no Pallas call (XLA code only)."""
    calls = pallas_kernel_calls(compiled)
    if not calls:
        return "none"
    kernels = []
    by_name: dict[str, list[PallasCall]] = {}
    for call in calls:
        by_name.setdefault(call.name, []).append(call)
    for name in sorted(by_name):
        backward = sum(c.backward for c in by_name[name])
        kernels.append(f"{name} x{len(by_name[name])}" + (f" ({backward} backward)" if backward else ""))
    targets = sorted({c.target for c in calls})
    return f"{', '.join(kernels)}; {len(calls)} calls to {' and '.join(targets)}"


# ---------------------------------------------------------------------------------------------
# Self-check: `python -m sharding.topology v5e:2x2 h200:1x8`

def self_check(devices) -> tuple[bool, str]:
    """Compile a toy pair of named Pallas kernels (a forward and, under jax.grad, its backward) for
    the target and count them back: proves the compiler plugin works and that pallas_kernel_calls
    reads this compiler's HLO, independently of the model's kernels. -> (ok, description)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    set_default_device(devices)
    params = None
    if devices[0].platform != "tpu":  # Triton, as pallas_kernels' GPU kernels use
        from jax.experimental.pallas import triton as plt

        params = plt.CompilerParams(num_warps=4)

    def double(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    def call(x, name):  # x: f32[128, 128]
        return pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), name=name,
                              compiler_params=params)(x)

    @jax.custom_vjp
    def scaled(x):
        return call(x, "selfcheck_forward")

    scaled.defvjp(lambda x: (call(x, "selfcheck_forward"), None), lambda _, g: (call(g, "selfcheck_backward"),))
    grad = jax.grad(lambda x: jnp.sum(scaled(x) ** 2))
    x = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(devices[0]))
    compiled = jax.jit(grad).lower(x).compile()
    found = sorted((c.name, c.backward) for c in pallas_kernel_calls(compiled))
    return found == [("selfcheck_backward", True), ("selfcheck_forward", False)], describe_pallas_calls(compiled)


def main(argv: list[str] | None = None) -> int:
    """Print each target's devices and HBM and run its self_check; 1 if any failed."""
    specs = sys.argv[1:] if argv is None else argv
    if not specs:
        print(__doc__)
        return 2
    failed = 0
    for spec in specs:
        try:
            devices = topology_devices(spec)
            ok, found = self_check(devices)
        except TopologyError as error:
            ok, devices, found = False, [], str(error)
        print(f"{spec}: {_describe_devices(devices)}; self-check {'ok' if ok else 'FAILED'}: {found}", flush=True)
        failed += not ok
    return 1 if failed else 0


def _describe_devices(devices) -> str:
    """`8 x NVIDIA H200 on 1 host(s), 140.4 GiB each`."""
    if not devices:
        return "no devices"
    hosts = len({d.process_index for d in devices})
    return f"{len(devices)} x {devices[0].device_kind} on {hosts} host(s), {hbm_bytes(devices[0]) / 2**30:.1f} GiB each"


if __name__ == "__main__":
    configure_environment()
    sys.exit(main())
