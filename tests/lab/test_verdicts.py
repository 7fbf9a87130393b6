"""Verdict rules on hand-made metrics: each sub-claim is decided by its stated rule, and the
report keeps one row per sub-claim and says 'inconclusive in quick mode' where quick mode
cannot decide."""

import numpy as np

from bnlab.lab.experiments import (
    batch_size,
    lr_sweep,
    mnist1d_sanity,
    momentum,
    placement,
)
from bnlab.lab.experiments.base import Finding, Verdict


def _correct(accuracy: float, examples: int = 400, seed: int = 0) -> list[int]:
    """A 0/1 vector with exactly ``accuracy`` of ones, in a seeded random order."""
    hits = np.zeros(examples, dtype=int)
    hits[: round(accuracy * examples)] = 1
    return np.random.default_rng(seed).permutation(hits).tolist()


def test_verdict_of_findings_and_quick_label():
    yes = Finding("a", True, "r", "rule")
    no = Finding("b", False, "r", "rule")
    open_ = Finding("c", None, "r", "rule")
    context = Finding("d", False, "r", "rule", context=True)
    assert Verdict.of([yes, context]).supported is True, "context rows do not decide"
    assert Verdict.of([yes, no]).supported is False
    undecided = Verdict.of([yes, open_])
    assert undecided.supported is None
    assert undecided.label_in("quick") == "inconclusive in quick mode"
    assert undecided.label_in("full") == "inconclusive"


def test_placement_equivalence_needs_a_narrow_interval():
    def near(hits, flips, seed):  # the same answers but ``flips`` of them changed
        hits = np.array(hits)
        index = np.random.default_rng(seed).choice(len(hits), flips, replace=False)
        hits[index] = 1 - hits[index]
        return hits.tolist()

    before = [_correct(0.80, 2000, s) for s in range(5)]
    same = {"arms": {"before": before, "after": [near(h, 20, s) for s, h in enumerate(before)]}}
    assert placement.verdict(same).findings[0].supported is True
    apart = {"arms": {"before": before, "after": [_correct(0.74, 2000, s) for s in range(5)]}}
    assert placement.verdict(apart).findings[0].supported is False
    # more noise must not mean more support: a tiny test set gives a wide interval, undecided
    noisy = {"arms": {"before": [_correct(0.8, 40, s) for s in range(2)], "after": [_correct(0.8, 40, s + 5) for s in range(2)]}}  # fmt: skip
    assert placement.verdict(noisy).findings[0].supported is None


def test_momentum_trend_per_factor():
    def gap(momentum_index, batch_index):  # grows with momentum, not with batch
        return _correct(0.02 + 0.05 * momentum_index, 400, momentum_index)

    metrics = {"momenta": [0.01, 0.9], "batch_sizes": [4, 64],
               "gap": [[[gap(m, b) for b in range(2)] for m in range(2)] for _ in range(3)]}  # fmt: skip
    findings = momentum.verdict(metrics).findings
    assert findings[0].supported is True, "gap grows with momentum"
    assert findings[1].supported is False, "no trend along the batch size"


def test_lr_sweep_sub_claims_and_failure_kinds():
    lrs = [0.01, 0.1, 1.0, 10.0]
    base = [0.60, 0.70, 0.0, 0.0]
    bn = [0.60, 0.75, 0.74, 0.50]
    metrics = {"learning_rates": lrs, "chance": 0.1, "arms": {
        "baseline": {"test_correct": [[_correct(a, 400, s) for a in base] for s in range(3)],
                     "train_loss": [[1.0, 0.8, 2.3, float("nan")]] * 3, "diverged": [[False, False, False, True]] * 3},
        "bn": {"test_correct": [[_correct(a, 400, s) for a in bn] for s in range(3)],
               "train_loss": [[1.0, 0.7, 0.7, 1.2]] * 3, "diverged": [[False] * 4] * 3}}}  # fmt: skip
    verdict = lr_sweep.verdict(metrics)
    trains, stable, best = verdict.findings
    assert trains.supported is True and "diverges at 10" in trains.result
    assert "fails to train (stalls, loss > 2.0) at 1" in trains.result
    assert stable.supported is True  # BN within 5 points of its best up to 1.0, baseline to 0.1
    assert best.supported is None or best.supported is False  # both peak at 0.1


def test_batch_size_margins():
    sizes = [2, 16]

    def arm(small, usual):
        return [
            [_correct(small, 1000, s), _correct(usual, 1000, s)] for s in range(3)
        ]  # nested answers

    metrics = {"batch_sizes": sizes, "accuracy": {"bn": arm(0.60, 0.80), "gn": arm(0.79, 0.80), "renorm": arm(0.70, 0.80)}}  # fmt: skip
    assert [f.supported for f in batch_size.verdict(metrics).findings] == [True, True, True]
    metrics["accuracy"]["renorm"] = arm(0.605, 0.80)  # within the 1-point margin: not "beats"
    assert batch_size.verdict(metrics).findings[2].supported is not True


def test_mnist1d_sanity_against_published():
    good = {"models": {"mlp": [_correct(0.68, 1000, s) for s in range(3)], "cnn": [_correct(0.935, 1000, s) for s in range(3)]}}  # fmt: skip
    assert mnist1d_sanity.verdict(good).supported is True
    bad = {"models": {"mlp": [_correct(0.50, 1000, s) for s in range(3)], "cnn": good["models"]["cnn"]}}  # fmt: skip
    assert mnist1d_sanity.verdict(bad).supported is False


def test_quick_mode_decides_only_robust_findings():
    robust = Finding("a", True, "r", "rule", "robust: the same verdict at thresholds 1, 2")
    fragile = Finding("b", False, "r", "rule", "sensitive: flips at 2 → inconclusive")
    verdict = Verdict.of([robust, fragile], "note")
    assert verdict.supported is False and verdict.in_mode("full") is verdict
    quick = verdict.in_mode("quick")
    assert [f.supported for f in quick.findings] == [True, None] and quick.note == "note"
    assert verdict.label_in("quick") == "inconclusive in quick mode"


def test_mnist1d_sanity_needs_the_published_budget():
    short = {"steps": 1500, "models": {"mlp": [_correct(0.68, 1000, s) for s in range(3)]}}
    verdict = mnist1d_sanity.verdict(short)
    assert verdict.supported is None and "fewer than the published 6000" in verdict.summary


def test_momentum_cells_train_until_the_running_averages_converge():
    assert momentum.steps_for(0.9, 4, 12000) == 3000  # enough examples already
    steps = momentum.steps_for(0.01, 64, 12000)  # 187 steps would leave 15% on the init
    assert steps == 459 and 0.99**steps <= 0.01 < 0.99 ** (steps - 1)
