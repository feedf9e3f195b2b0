"""Settings and fixtures shared by every test file.

XLA:CPU compile flags: the tests compile a few hundred small programs and run each only a few times,
and at these shapes LLVM's optimisations cost far more compile time than they save run time
(tests/test_model.py: 131 s -> 56 s). They are set here, before any test starts JAX, so that the
subprocesses the tests launch inherit them; a test that sets XLA_FLAGS for a subprocess extends
os.environ["XLA_FLAGS"] rather than replacing it. Numerics are compared with tolerances against
independent references, and bitwise comparisons (resume) run both sides under the same flags.
"""

import os
import random

import pytest

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):  # once, also where pytest-xdist's workers inherit it
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), FAST_COMPILE]))


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A directory holding corpus.txt: 80 short documents of KJV-like words, separated by blank lines,
    small enough that a tiny model's tokenizer and a few training steps take seconds. One per test
    session: the files that drive train.py share its cache/ (the trained tokenizer, the token cache and
    the compiled steps, which depend only on the model and batch shape), so only the first run compiles."""
    root = tmp_path_factory.mktemp("workspace")
    rng = random.Random(0)
    words = "and the lord spake unto moses saying speak unto the children of israel when any man bring".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(80)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    return root
