"""Meshes and `jax.shard_map` code for expert parallelism and N-gram table sharding."""
