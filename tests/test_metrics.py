"""Each parity metric against values computed by hand, so a metric that always passes is caught."""

import math

import numpy as np
import pytest

from vlexport.parity import metrics
from vlexport.parity.verify import evaluate


def test_cosine_and_norm_ratio():
    assert metrics.cosine([1, 0], [0, 1]) == pytest.approx(0.0)
    assert metrics.cosine([1, 2, 2], [2, 4, 4]) == pytest.approx(1.0)
    assert metrics.cosine([1, 1], [1, 0]) == pytest.approx(1 / math.sqrt(2))
    assert metrics.norm_ratio([3, 4], [6, 8]) == pytest.approx(2.0)  # cosine 1, yet twice too large


def test_error_stats_and_minimum_tolerances():
    ref = np.array([1.0, 2.0, -4.0, 0.5])
    test = np.array([1.1, 2.0, -3.0, 0.5])
    s = metrics.error_stats(ref, test)
    assert s["max_abs"] == pytest.approx(1.0)
    assert s["max_rel"] == pytest.approx(0.25)  # 1.0 / |-4|
    assert s["min_atol"] == pytest.approx(1.0)
    assert s["min_rtol"] == pytest.approx(0.25)
    # min tolerances are exactly the smallest that pass numpy.isclose's rule
    assert np.allclose(test, ref, atol=s["min_atol"], rtol=0)
    assert not np.allclose(test, ref, atol=s["min_atol"] * 0.99, rtol=0)
    assert np.allclose(test, ref, atol=0, rtol=s["min_rtol"] + 1e-12)
    diffs = np.abs(ref - test)
    assert s["p99_abs"] == pytest.approx(np.percentile(diffs, 99, method="higher"))


def test_kl_by_hand():
    ref = np.array([[math.log(0.5), math.log(0.5)]])
    test = np.array([[math.log(0.9), math.log(0.1)]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert metrics.kl_per_token(ref, test)[0] == pytest.approx(expected)
    assert metrics.kl_per_token(ref, ref + 3.0)[0] == pytest.approx(0.0, abs=1e-12)  # shift-invariant


def test_top1_and_logit_metrics():
    ref = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    test = np.array([[0.0, 1.0, 0.6], [0.0, 2.0, 0.0], [0.0, 0.1, -1.0]])
    assert metrics.top1_agreement(ref, test) == pytest.approx(1 / 3)
    m = metrics.logit_metrics(ref, test)
    assert m["max_abs_logit_diff"] == pytest.approx(2.0)
    assert m["logit_scale"] == pytest.approx(2.0)
    assert m["max_rel_logit_diff"] == pytest.approx(1.0)
    assert m["tokens"] == 3


def test_greedy_match():
    assert metrics.greedy_match([1, 2, 3], [1, 2, 3]) == {"exact": True, "first_divergence": None, "ref_tokens": 3, "test_tokens": 3}
    assert metrics.greedy_match([1, 2, 3], [1, 5, 3])["first_divergence"] == 1
    assert metrics.greedy_match([1, 2, 3], [1, 2])["first_divergence"] == 2


def test_evaluate_names_the_worst_case():
    cases = [
        {"name": "a", "decoder": {"logits": {"max_rel_logit_diff": 1e-6}}, "generate": {"tokens": {"exact": True}}},
        {"name": "b", "decoder": {"logits": {"max_rel_logit_diff": 3e-4}}, "generate": {"tokens": {"exact": False}}},
    ]
    checks, passed = evaluate(cases, {"logit_rel_tol": 1e-4, "greedy_exact_match": 0.5})
    assert not passed
    by_metric = {c["metric"]: c for c in checks}
    assert by_metric["max_rel_logit_diff"]["worst_case"] == "b" and not by_metric["max_rel_logit_diff"]["passed"]
    assert by_metric["exact_match_rate"]["value"] == 0.5 and by_metric["exact_match_rate"]["passed"]


def test_zero_checks_fail():
    cases = [{"name": "a", "vision": {"image_features": {"cosine": 1.0}}}]
    for thresholds in ({}, {"logit_rel_tol": 1e-4}):  # nothing to check, or nothing that applies to these outputs
        checks, passed = evaluate(cases, thresholds)
        assert not passed and [c["threshold"] for c in checks] == ["no checks"]
        assert "cannot pass" in checks[0]["message"]
    assert not evaluate([], {"logit_rel_tol": 1e-4})[1]


def test_unknown_threshold_key_fails_by_name():
    cases = [{"name": "a", "decoder": {"logits": {"max_rel_logit_diff": 0.0}}}]
    checks, passed = evaluate(cases, {"logit_rel_tol": 1e-4, "logit_rel_tl": 1e-4})
    assert not passed and [c["threshold"] for c in checks if not c["passed"]] == ["logit_rel_tl"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("metric,key", [("max_rel_logit_diff", "logit_rel_tol"), ("cosine", "logit_cosine_min")])
def test_non_finite_metric_fails_in_any_order(bad, metric, key):
    good = {"name": "good", "decoder": {"logits": {metric: 1e-6 if metric != "cosine" else 1.0}}}
    worse = {"name": "bad", "decoder": {"logits": {metric: bad}}}
    for cases in ([good, worse], [worse, good]):
        checks, passed = evaluate(cases, {key: 1e-4 if metric != "cosine" else 0.999})
        assert not passed, (bad, metric)
        assert checks[0]["worst_case"] == "bad" and "non-finite" in checks[0]["message"]


def test_non_finite_top1_fails():
    cases = [{"name": "a", "decoder": {"logits": {"top1_agreement": 1.0, "tokens": 4}}},
             {"name": "b", "decoder": {"logits": {"top1_agreement": math.nan, "tokens": 4}}}]
    checks, passed = evaluate(cases, {"top1_min": 0.5})
    assert not passed and checks[0]["worst_case"] == "b"


def test_non_finite_limit_fails():
    cases = [{"name": "a", "decoder": {"logits": {"max_rel_logit_diff": 1.0}}}]
    assert not evaluate(cases, {"logit_rel_tol": math.inf})[1]
