"""Live parity against `transformers` (runs only where torch and transformers are importable; CI
uses the committed golden fixtures instead): a freshly generated random checkpoint imports with
matching logits, routing and greedy tokens, and our export loads into LongcatFlashForCausalLM with
no missing, unexpected or reshaped tensor and gives the same logits."""

import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lite import convert  # noqa: E402
from test_convert import check_parity  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixtures():
    spec = importlib.util.spec_from_file_location("make_hf_fixtures", ROOT / "scripts" / "make_hf_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", ["yarn", "ngram"])
def test_live_import_parity_and_export_loads_in_transformers(case, fixtures, tmp_path):
    fixtures.make_case(case, tmp_path / "hf", seed=1)  # not the committed seed: fresh weights
    check_parity(tmp_path / "hf", tmp_path)
    convert.to_hf(tmp_path / "ours", tmp_path / "exported")
    if case == "ngram":  # no transformers class; the export must at least re-import identically
        convert.from_hf(tmp_path / "exported", tmp_path / "again")
        assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "ours" / "model.safetensors").read_bytes()
        return
    model, info = transformers.LongcatFlashForCausalLM.from_pretrained(tmp_path / "exported", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    expected = np.load(tmp_path / "hf" / "expected.npz")
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(expected["tokens"]).long()).logits.numpy()
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-4, rtol=0)
