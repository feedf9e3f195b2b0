"""Peak host memory of the sharded streaming load (`lite.checkpoint.load_model(dir, mesh)`) on 8
fake CPU devices, from a generated multi-GB Hugging Face checkpoint read directly (no conversion).

    python scripts/load_memory_benchmark.py [--dir /tmp/load-bench] [--layers 8] [--mesh expert=8] [--keep]

Writes the random bfloat16 Lite-style checkpoint of scripts/convert_memory_benchmark.py, then in
child processes (XLA_FLAGS=--xla_force_host_platform_device_count=8) measures the peak resident
memory (ru_maxrss) of: the interpreter with the project imported and 8 devices up (baseline), and
load_model with the mesh. On CPU the 8 devices' buffers live in the process itself, so the table
also gives what the devices hold (every device's slices together: the sharded tensors once, the
replicated ones 8 times) and the remainder: the loader's own host memory.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import time

from convert_memory_benchmark import bench_config, directory_bytes, peak_rss_of, write_random_hf_checkpoint

CHILD = """
import sys, time, jax
from lite.checkpoint import load_model, model_state_arrays
from sharding.mesh import make_mesh
mesh = make_mesh(sys.argv[2])
if sys.argv[1] != "-":
    start = time.time()
    model = load_model(sys.argv[1], mesh=mesh)
    arrays = jax.block_until_ready(model_state_arrays(model))
    held = sum(shard.data.nbytes for a in arrays.values() for shard in a.addressable_shards)
    biggest = max(max(shard.data.nbytes for shard in a.addressable_shards) for a in arrays.values())
    print(held, biggest, time.time() - start, file=sys.stderr)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/load-bench"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--mesh", default="expert=8")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    os.environ.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    cfg = bench_config(args.layers)
    if not (args.dir / "hf").exists():
        shutil.rmtree(args.dir, ignore_errors=True)
        start = time.time()
        write_random_hf_checkpoint(cfg, args.dir / "hf")
        print(f"generated in {time.time() - start:.0f} s", flush=True)
    try:
        total = directory_bytes(args.dir / "hf")
        base, _ = peak_rss_of([sys.executable, "-c", CHILD, "-", args.mesh])
        done = subprocess.run([sys.executable, "-c", "import resource, subprocess, sys; "
                               "subprocess.run(sys.argv[1:], check=True); "
                               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)",
                               sys.executable, "-c", CHILD, str(args.dir / "hf"), args.mesh],
                              check=True, capture_output=True, text=True)
        held, biggest, seconds = map(float, done.stderr.split()[-3:])
        peak = float(done.stdout.split()[-1])
        mib = 2**20
        print(f"\nHF checkpoint {total / 2**30:.2f} GiB ({cfg.num_layers} layers, {cfg.n_routed_experts} experts, "
              f"{cfg.ngram_total_rows} N-gram rows, bf16), read directly; mesh {args.mesh} on 8 CPU devices\n")
        print(f"{'':44} {'MiB':>8}")
        for what, value in [("checkpoint", total / mib),
                            ("baseline (python, project, 8 devices)", base),
                            ("peak RSS of load_model(dir, mesh)", peak),
                            ("  of which the 8 devices' buffers", held / mib),
                            ("  of which one device's share (1/8)", held / 8 / mib),
                            ("  largest single device slice", biggest / mib),
                            ("  loader overhead: peak - baseline - buffers", peak - base - held / mib)]:
            print(f"{what:44} {value:8.0f}")
        print(f"load time {seconds:.1f} s")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
