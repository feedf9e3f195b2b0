"""LongCat-Flash-Lite (N-gram) checkpoints: a plain NumPy reference of the N-gram embedding built
from ARCHITECTURE.md section 2 and HF_CHECKPOINT.md, and end-to-end parity of an imported Lite-style
checkpoint (plain transformer keys + model.ngram_embeddings.*) against golden logits that
scripts/make_hf_fixtures.py computed with `transformers`' trunk fed this reference's embeddings."""

import json
import pathlib

import numpy as np

from oracles import python_ngram_ids

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


def ngram_embedding_reference(tokens, token_table, embedders, post_projs, hf_config):
    """float64[B, L, D] from int[B, L] tokens and the HF tensors, in Python integers and NumPy.

    e_i = (E0(t_i) + sum_s P_s E_s(H_s)) / (S + 1) with S = (N-1)K sub-tables, s = (n-2)K + (k-1),
    V_s = ratio * V0 + 2s + 1, H_s = (sum_{j<n} t_{i-j} * (V0^j mod V_s)) mod V_s; tokens before the
    sequence start or before the token after an EOS count as 0.
    """
    v0, n_max, k = hf_config["vocab_size"], hf_config["emb_neighbor_num"], hf_config["emb_split_num"]
    ratio, eos = hf_config["ngram_vocab_size_ratio"], hf_config["eos_token_id"]
    num_tables = (n_max - 1) * k
    out = np.zeros(tokens.shape + (token_table.shape[1],))
    for b, row in enumerate(np.asarray(tokens).tolist()):
        ids = python_ngram_ids(row, vocab_size=v0, max_order=n_max, tables_per_order=k, ratio=ratio, eos=eos)
        for i, token in enumerate(row):
            total = token_table[token].astype(np.float64)
            for s in range(num_tables):
                assert embedders[s].shape[0] == ratio * v0 + 2 * s + 1
                total = total + post_projs[s].astype(np.float64) @ embedders[s][ids[i, s]].astype(np.float64)
            out[b, i] = total / (num_tables + 1)
    return out


def test_imported_lite_embedding_matches_numpy_reference(tmp_path):
    """Our N-gram embedding of an imported Lite checkpoint equals the reference on the HF tensors,
    with EOS restarts inside the rows and every sub-table of orders 2..N."""
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from lite.checkpoint import load_model
    from lite.convert import from_hf

    source = FIXTURES / "ngram"
    hf_config = json.loads((source / "config.json").read_text())
    tensors = {}
    for shard in sorted(set(json.loads((source / "model.safetensors.index.json").read_text())["weight_map"].values())):
        tensors.update(load_file(str(source / shard)))
    s = (hf_config["emb_neighbor_num"] - 1) * hf_config["emb_split_num"]
    embedders = [tensors[f"model.ngram_embeddings.embedders.{t}.weight"] for t in range(s)]
    post_projs = [tensors[f"model.ngram_embeddings.post_projs.{t}.weight"] for t in range(s)]
    tokens = np.load(source / "expected.npz")["tokens"]
    assert (tokens[:, 1:-1] == hf_config["eos_token_id"]).any()
    want = ngram_embedding_reference(tokens, tensors["model.embed_tokens.weight"], embedders, post_projs, hf_config)

    from_hf(source, tmp_path / "ours")
    model = load_model(tmp_path / "ours")
    got = np.asarray(model.embed(jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The reference is not trivially the token embedding alone.
    assert np.abs(want - tensors["model.embed_tokens.weight"][tokens]).max() > 0.1


def test_reference_hash_restarts_after_eos():
    """Hand-computed case: V0 = 10, N = 2, K = 1, ratio 1 -> one sub-table of V_0 = 11 rows."""
    cfg = {"vocab_size": 10, "emb_neighbor_num": 2, "emb_split_num": 1, "ngram_vocab_size_ratio": 1, "eos_token_id": 2}
    table = np.eye(11)  # row h of the sub-table is one-hot h, projection identity: output reveals h
    out = ngram_embedding_reference(np.array([[7, 5, 2, 5]]), np.zeros((10, 11)), [table], [np.eye(11)], cfg)
    hashes = (out[0] * 2).argmax(-1)  # / (S + 1) = / 2
    # h = t_i + t_{i-1} * (10 mod 11) mod 11: [7, 5 + 70 = 75 mod 11 = 9, 2 + 50 = 52 mod 11 = 8, 5 (restart)]
    assert hashes.tolist() == [7, 9, 8, 5]
