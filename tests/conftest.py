"""Fixtures shared by the test files that drive train.py."""

import random

import pytest


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A directory holding corpus.txt: 80 short documents of KJV-like words, separated by blank lines,
    small enough that a tiny model's tokenizer and a few training steps take seconds."""
    root = tmp_path_factory.mktemp("workspace")
    rng = random.Random(0)
    words = "and the lord spake unto moses saying speak unto the children of israel when any man bring".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(80)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    return root
