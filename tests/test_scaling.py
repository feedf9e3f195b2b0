"""The embedding-vs-experts sweep: matched parameter budgets, and a whole tiny sweep end to end."""

import json

import numpy as np
import pytest

from lite.config import get_config
from lite.experiments import scaling

TINY = ["--set", "vocab_size=320", "--set", "hidden_size=32", "--set", "q_lora_rank=16", "--set", "kv_lora_rank=8",
        "--set", "qk_nope_head_dim=8", "--set", "qk_rope_head_dim=4", "--set", "v_head_dim=8",
        "--set", "ffn_hidden_size=64", "--set", "expert_ffn_hidden_size=16"]


def test_pairs_add_equal_parameters_at_equal_activated():
    base = get_config("demo", **scaling.SWEEP_BASE)
    points = scaling.sweep_points(base, [2, 8])
    assert [p.label for p in points] == ["base E=4", "experts r=2", "ngram r=2", "experts r=8", "ngram r=8"]
    d, layers, f = base.hidden_size, base.num_layers, base.expert_ffn_hidden_size
    per_expert = 3 * d * f * layers  # gate, up, down of one expert in every layer
    for r in (2, 8):
        ngram = next(p for p in points if p.label == f"ngram r={r}").config
        experts = next(p for p in points if p.label == f"experts r={r}").config
        # The N-gram embedding adds S tables of r*V0 + 2s + 1 rows of width D/S and S projections [D/S, D].
        s = 4  # N = 3, K = 2
        added = sum(r * base.vocab_size + 2 * i + 1 for i in range(s)) * (d // s) + s * (d // s) * d
        assert ngram.ngram_vocab_ratio == r and ngram.n_routed_experts == base.n_routed_experts
        assert experts.n_routed_experts == base.n_routed_experts + round(added / per_expert)
        assert not experts.has_ngram
    totals = {p.label: p.total_params for p in points}
    activated = {p.label: p.activated_params for p in points}
    for r in (2, 8):
        assert abs(totals[f"ngram r={r}"] - totals[f"experts r={r}"]) <= per_expert / 2
        # Activated grow by the N-gram projections on one path (table rows are looked up, not multiplied)
        # and by the wider router on the other: under 2% of the base either way.
        router_growth = (next(p for p in points if p.label == f"experts r={r}").config.n_routed_experts - 4) * d * layers
        assert activated[f"ngram r={r}"] - activated["base E=4"] == pytest.approx(d * d)
        assert activated[f"experts r={r}"] - activated["base E=4"] == pytest.approx(router_growth)
        assert max(d * d, router_growth) < 0.02 * activated["base E=4"]


def test_base_with_ngram_or_zero_experts_is_refused():
    with pytest.raises(ValueError, match="no N-gram table and no zero experts"):
        scaling.sweep_points(get_config("demo"), [2])


def test_summary_averages_seeds_and_compares_within_the_spread():
    base = get_config("demo", **scaling.SWEEP_BASE)
    points = scaling.sweep_points(base, [2, 4])

    def run(label, seed, val):
        return dict(label=label, seed=seed, val_loss=val, train_loss=val - 0.5)

    runs = [run("base E=4", 0, 5.0), run("experts r=2", 0, 4.9), run("experts r=2", 1, 4.7),
            run("ngram r=2", 0, 4.5), run("ngram r=2", 1, 4.6),  # better by 0.25, spread 0.2
            run("experts r=4", 0, 4.50), run("experts r=4", 1, 4.60),
            run("ngram r=4", 0, 4.52), run("ngram r=4", 1, 4.62)]  # 0.02 apart, spread 0.1
    rows = {row["label"]: row for row in scaling.summarize(points, runs)}
    assert rows["experts r=2"]["val_loss"] == pytest.approx((4.8, 4.7, 4.9))
    assert rows["ngram r=2"]["train_loss"] == pytest.approx((4.05, 4.0, 4.1))
    assert rows["experts r=2"]["seeds"] == [0, 1] and rows["base E=4"]["seeds"] == [0]
    assert rows["ngram r=4"]["ratio"] == pytest.approx(rows["ngram r=4"]["total"] / rows["ngram r=4"]["activated"])
    first, second = scaling.compare_pairs(list(rows.values()))
    assert "N-gram better by 0.250 (seed spread 0.200)" in first
    assert "within the seed spread" in second
    table = scaling.format_table(list(rows.values()))
    assert "| experts r=2 | 15 | 0% |" in table and "4.800 (4.700-4.900)" in table


def test_tiny_sweep_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["light", "water", "earth", "heaven", "night", "day", "the", "and", "of", "was", "said", "god"]
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(60)))
    args = ["--data", str(corpus), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--ngram-ratios", "1", "--seeds", "0", *TINY]
    assert scaling.main(args) == 0
    runs = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in runs) == ["base E=4", "experts r=1", "ngram r=1"]
    assert all(np.isfinite(r["val_loss"]) and 0 < r["val_loss"] < np.log(320) + 1 for r in runs)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["val_loss"][0] for row in summary] == [r["val_loss"] for r in runs]
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 10_000

    # A second invocation trains nothing and reports the same table; other settings are refused.
    capsys.readouterr()
    monkeypatch.setattr(scaling, "train_point", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert scaling.main(args) == 0
    assert "0 of 3 runs to train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings.*steps"):
        scaling.main([a if a != "3" else "4" for a in args])
