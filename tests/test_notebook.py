"""notebooks/demo.ipynb runs top to bottom on CPU (tiny preset, a few steps, through the environment
variables of its parameters cell), and what it prints is right: the N-gram id table against the hash
formula in plain Python integers, a loss that starts at ln(vocab_size) and falls, samples that continue
the prompts, the real model's parameter total."""

import ast
import math
import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

from lite.config import get_config
from lite.data import kjv_corpus, load_tokenizer, train_tokenizer
from oracles import python_ngram_ids_of

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "demo.ipynb"
PRESET = "tiny"
SMALL_RUN = dict(DEMO_PRESET=PRESET, DEMO_TRAIN_STEPS="8", DEMO_BATCH_SIZE="4", DEMO_SEQ_LEN="64",
                 DEMO_PLOT_EVERY="4", DEMO_SAMPLE_TOKENS="8")
CELL_TIMEOUT_S = 300  # per cell; the whole notebook takes well under a minute on an idle 2-core CPU


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tokenizer_cache")


@pytest.fixture(scope="module")
def executed(tokenizer_cache) -> dict[str, nbformat.NotebookNode]:
    """Runs the notebook in a fresh kernel; returns its tagged cells, with their outputs, by tag."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {**os.environ, **SMALL_RUN, "DEMO_TOKENIZER_CACHE": str(tokenizer_cache), "JAX_PLATFORMS": "cpu",
           # This checkout, not whatever `lite` an installed copy of the project would give.
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # XLA_FLAGS comes from os.environ: conftest.py's fast-compile flags (notebook 72 s -> 43 s).
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    return {tag: cell for cell in notebook.cells for tag in cell.metadata.get("tags", [])}


def text(cell) -> str:
    """What the cell printed, and the text form of what it displayed other than figures."""
    parts = []
    for output in cell.outputs:
        data = output.get("data", {})
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif "image/png" not in data:
            parts.append(data.get("text/plain", ""))
    return "".join(parts)


def figures(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.outputs)


def test_notebook_is_saved_with_the_outputs_of_a_clean_run():
    """A reader sees a whole run without running it: every code cell ran, in order, and printed
    something; no errors, no stderr noise, figures where the notebook draws them."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    for cell in code_cells:
        kinds = {(output.output_type, output.get("name")) for output in cell.outputs}
        tags = cell.metadata.get("tags", [])
        assert cell.outputs or "parameters" in tags, cell.source[:80]
        assert not any(kind == "error" or name == "stderr" for kind, name in kinds), cell.source[:80]
    tagged = {tag: cell for cell in code_cells for tag in cell.metadata.get("tags", [])}
    assert figures(tagged["train"]) == 1 and figures(tagged["expert-load"]) == 1
    assert re.search(r"^total\s+68,\d{3},\d{3},\d{3}\s", text(tagged["param-budget"]), re.MULTILINE)


def test_ngram_id_table_matches_the_hash_formula(executed, tokenizer_cache):
    cfg = get_config(PRESET)
    sentence, header, *rows = text(executed["ngram-ids"]).strip().splitlines()
    tokenizer = load_tokenizer(train_tokenizer(kjv_corpus().train, cfg, tokenizer_cache))
    tokens = [cfg.bos_token_id] + tokenizer.encode(sentence)
    assert cfg.eos_token_id not in tokens and len(rows) == len(tokens)
    expected = python_ngram_ids_of(tokens, cfg).tolist()
    assert header.split()[:2] == ["token", "piece"] and header.count("-gram mod") == len(expected[0])
    for line, token, want in zip(rows, tokens, expected):
        token_id, piece, *ids = line.split()
        assert (int(token_id), piece) == (token, tokenizer.id_to_piece(token))
        assert [int(i) for i in ids] == want, line


def test_training_loss_starts_at_chance_and_falls(executed):
    output = text(executed["train"])
    match = re.search(r"loss at step 1: ([\d.]+) .*; mean of the last \d+ steps: ([\d.]+)", output)
    assert match, output
    first, final = float(match[1]), float(match[2])
    assert math.isfinite(final)
    # Small random weights give near-uniform predictions over the vocabulary.
    assert first == pytest.approx(math.log(get_config(PRESET).vocab_size), abs=0.05)
    assert final < first - 0.1
    assert figures(executed["train"]) == 1  # clear_output leaves the last redraw of the loss plot


def test_samples_continue_the_prompts(executed):
    lines = [line[2:] for line in text(executed["sample"]).splitlines() if line.startswith("> ")]
    prompts = ["In the beginning", "And the LORD said unto Moses,", "Blessed are the"]
    assert len(lines) == len(prompts)
    for line, prompt in zip(lines, prompts):
        assert line.startswith(prompt)


def test_expert_load_plot_and_real_parameter_budget(executed):
    assert figures(executed["expert-load"]) == 1
    found = re.search(r"FFN experts per token, by layer: \[(.*)\]", text(executed["expert-load"]))
    cfg = get_config(PRESET)
    per_layer = [float(x) for x in found[1].split(",")]
    assert len(per_layer) == cfg.num_layers and all(0 <= x <= cfg.moe_topk for x in per_layer)
    # 68,562,459,648: the released LongCat-Flash-Lite's total (README, Parameter counts).
    assert re.search(r"^total\s+68,562,459,648\s", text(executed["param-budget"]), re.MULTILINE)


def install_helpers() -> dict:
    """The install cell's functions and constants (not its pip call), run in a namespace."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    source = next(cell.source for cell in notebook.cells if "def preinstalled_jax_is_enough" in cell.source)
    tree = ast.parse(source)
    tree.body = [node for node in tree.body if not isinstance(node, ast.If)]  # keep defs, imports, constants
    namespace: dict = {}
    exec(compile(tree, "install cell", "exec"), namespace)
    return namespace


def test_colab_install_keeps_a_preinstalled_jax_that_is_new_enough(monkeypatch):
    cell = install_helpers()
    floor = re.search(r'"jax>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert cell["JAX_FLOOR"] == tuple(int(p) for p in floor.split("."))  # the cell follows pyproject
    versions = {"0.10.2": True, "0.11.2": True, "1.0.0rc1": True, "0.7.2": False, "0.10.1": False}
    for version, enough in versions.items():
        monkeypatch.setattr(cell["importlib"].metadata, "version", lambda name, v=version: v)
        assert cell["preinstalled_jax_is_enough"]() is enough, version
