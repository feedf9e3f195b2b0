"""Peak memory of streaming checkpoint conversion on a generated multi-GB Hugging Face checkpoint.

    python scripts/convert_memory_benchmark.py [--dir /tmp/convert-bench] [--layers 8] [--keep]

Writes a random bfloat16 Lite-style checkpoint (N-gram tables, 64 experts per layer, 3 shards)
tensor by tensor, converts it HF -> ours -> HF with `python -m lite.convert` in child processes,
and prints each child's peak resident memory (ru_maxrss) next to the checkpoint size and the
baseline of a child that only imports lite.convert. Deletes everything afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from lite import hf as hf_lib
from lite.config import ModelConfig
from lite.checkpoint import INDEX_FILE, TensorPlan, piece_shape, state_shapes, write_safetensors


def bench_config(layers: int) -> ModelConfig:
    return ModelConfig(
        name="convert-bench", vocab_size=32768, hidden_size=1024, num_layers=layers, num_heads=8,
        q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        ffn_hidden_size=2816, n_routed_experts=64, zero_expert_num=32, moe_topk=6, expert_ffn_hidden_size=512,
        target_ffn_experts_per_token=4.0, ngram_n=3, ngram_k=2, ngram_vocab_ratio=4,
        param_dtype="bfloat16", compute_dtype="bfloat16")


def write_random_hf_checkpoint(cfg: ModelConfig, directory: pathlib.Path, shards: int = 3) -> int:
    """A random HF checkpoint of `cfg`, generated and written one tensor at a time; returns its bytes."""
    shapes = state_shapes(cfg)
    rng = np.random.default_rng(0)
    plans = []
    for name, pieces in hf_lib.tensor_layout(cfg).items():
        dtype = np.float32 if shapes[name].dtype == np.float32 else ml_dtypes.bfloat16
        for piece in pieces:
            shape = piece_shape(shapes[name].shape, piece.index, piece.transpose)

            def write(emit, shape=shape, dtype=dtype):
                rows = max(1, (32 << 20) // (4 * int(np.prod(shape[1:], dtype=np.int64))))
                for r0 in range(0, shape[0], rows):  # 32 MiB of float32 at a time
                    emit(rng.standard_normal((min(rows, shape[0] - r0),) + shape[1:], np.float32).astype(dtype))

            plans.append(TensorPlan(piece.hf_key, dtype, shape, write))
    directory.mkdir(parents=True)
    total = sum(p.nbytes for p in plans)
    per_shard, weight_map, start = -(-total // shards), {}, 0
    for i in range(shards):
        shard, size = [], 0
        while start < len(plans) and (size < per_shard or not shard):
            shard.append(plans[start])
            size += plans[start].nbytes
            start += 1
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(directory / file_name, shard, {"format": "pt"})
        weight_map.update({p.name: file_name for p in shard})
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_lib.config_to_hf(cfg), indent=2))
    return total


def peak_rss_of(command: list[str]) -> tuple[float, float]:
    """(peak resident MiB, seconds) of a child process; ru_maxrss of RUSAGE_CHILDREN is the largest
    child so far, so each measurement runs in its own intermediate process."""
    probe = ("import resource, subprocess, sys, time; t = time.time(); subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.time() - t)")
    out = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True)
    rss, seconds = out.stdout.split()[-2:]
    return float(rss), float(seconds)


def directory_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/convert-bench"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.dir.exists():
        shutil.rmtree(args.dir)
    cfg = bench_config(args.layers)
    try:
        start = time.time()
        total = write_random_hf_checkpoint(cfg, args.dir / "hf")
        print(f"generated {total / 2**30:.2f} GiB ({cfg.num_layers} layers, {cfg.n_routed_experts} experts, "
              f"{cfg.ngram_total_rows} N-gram rows, bfloat16) in {time.time() - start:.0f} s", flush=True)
        convert = [sys.executable, "-m", "lite.convert", "--quiet"]
        rows = [("python + import lite.convert (baseline)", 0, *peak_rss_of([sys.executable, "-c", "import lite.convert"]))]
        rows.append(("--from-hf (HF shards -> ours)", directory_bytes(args.dir / "hf"),
                     *peak_rss_of(convert + ["--from-hf", str(args.dir / "hf"), "--out", str(args.dir / "ours")])))
        rows.append(("--to-hf (ours -> HF, 1GB shards)", directory_bytes(args.dir / "ours"),
                     *peak_rss_of(convert + ["--to-hf", str(args.dir / "ours"), "--out", str(args.dir / "back"),
                                             "--max-shard-size", "1GB"])))
        print(f"\n{'conversion':42} {'checkpoint':>11} {'peak RSS':>10} {'time':>7}")
        for what, size, rss, seconds in rows:
            print(f"{what:42} {size / 2**30:9.2f}GiB {rss:7.0f}MiB {seconds:6.1f}s")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
