"""lite.host.keep_freed_memory: the training step's freed buffers are reused, not faulted in again.

The tiny preset's training step in two processes, one with the setting and one without, counting
each step's page faults after the first step; the fewest of six steps counts, because the kernel's
own memory reclaim (DAMON on this VM) pages cold memory out now and then, and a step that touches it
again faults through no doing of malloc's (about 20 s).
"""

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
from lite.host import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
import jax, jax.numpy as jnp, numpy as np
from lite.config import get_config
from lite.training import TrainConfig, init_state, make_train_step
cfg = get_config("tiny")
tcfg = TrainConfig(batch_size=8, seq_len=128, steps=10)
graphdef, state, tx = init_state(cfg, tcfg)
tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (8, 128)), jnp.int32)
segments = jnp.ones_like(tokens)
step = jax.jit(make_train_step(graphdef, tx, cfg, tcfg))
jax.block_until_ready(step(state, tokens, segments, jnp.int32(10)))
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(state, tokens, segments, jnp.int32(10)))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, min(faults))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_training_step_buffers_are_reused_instead_of_faulted_in_again():
    runs = {mode: subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for mode in ("keep", "default")}
    results = {}
    for mode, process in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        results[mode] = out.split()[-2:]
    assert results["keep"][0] == "True"
    assert float(results["default"][1]) > 1_000  # glibc hands the step's buffers back and faults them in again
    assert float(results["keep"][1]) < 100
