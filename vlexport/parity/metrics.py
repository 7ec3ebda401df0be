"""Parity metrics, pure numpy. Each is checked against hand-computed values in tests/test_metrics.py."""

from __future__ import annotations

import numpy as np


def _flat(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def cosine(ref, test) -> float:
    a, b = _flat(ref), _flat(test)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    if denom == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(a @ b / denom)


def norm_ratio(ref, test) -> float:
    """‖test‖ / ‖ref‖: catches a uniformly scaled output that cosine alone misses."""
    a, b = np.linalg.norm(_flat(ref)), np.linalg.norm(_flat(test))
    return float(b / a) if a else (1.0 if b == 0 else float("inf"))


def error_stats(ref, test) -> dict:
    """max and p99 of |Δ| and of |Δ|/|ref|, and the minimum atol (rtol=0) and rtol (atol=0) that would pass.

    Following Polygraphy, an element passes a tolerance pair if |Δ| <= atol + rtol*|ref| (numpy.isclose's rule).
    """
    a, b = _flat(ref), _flat(test)
    if a.size == 0:
        return {"max_abs": 0.0, "p99_abs": 0.0, "max_rel": 0.0, "p99_rel": 0.0, "min_atol": 0.0, "min_rtol": 0.0}
    diff = np.abs(a - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(a))
    return {
        "max_abs": float(diff.max()),
        "p99_abs": float(np.percentile(diff, 99, method="higher")),
        "max_rel": float(rel.max()),
        "p99_rel": float(np.percentile(rel, 99, method="higher")),
        "min_atol": float(diff.max()),
        "min_rtol": float(rel.max()),
    }


def feature_metrics(ref, test) -> dict:
    """Vision features (or any activations): cosine, norm ratio, error statistics and max |diff| / the ref's scale."""
    out = {"cosine": cosine(ref, test), "norm_ratio": norm_ratio(ref, test), "scale": float(np.abs(ref).max()),
           **error_stats(ref, test)}
    out["max_rel_to_scale"] = out["max_abs"] / max(out["scale"], 1e-12)
    return out


def log_softmax(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_per_token(ref_logits, test_logits) -> np.ndarray:
    """KL(ref ‖ test) in nats for each row of [..., vocab] logits."""
    lp, lq = log_softmax(ref_logits), log_softmax(test_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def top1_agreement(ref_logits, test_logits) -> float:
    r = np.asarray(ref_logits).argmax(-1)
    t = np.asarray(test_logits).argmax(-1)
    return float((r == t).mean()) if r.size else 1.0


def logit_metrics(ref_logits, test_logits) -> dict:
    """Teacher-forced logits [tokens, vocab]: KL, top-1, |Δlogit| (also relative to the logit scale), cosine."""
    ref = np.asarray(ref_logits, dtype=np.float64)
    test = np.asarray(test_logits, dtype=np.float64)
    kl = kl_per_token(ref, test)
    scale = float(np.abs(ref).max()) if ref.size else 1.0
    stats = error_stats(ref, test)
    return {
        "tokens": int(ref.shape[0]),
        "nonfinite": int((~np.isfinite(test)).sum()),
        "kl_mean": float(kl.mean()) if kl.size else 0.0,
        "kl_max": float(kl.max()) if kl.size else 0.0,
        "top1_agreement": top1_agreement(ref, test),
        "max_abs_logit_diff": stats["max_abs"],
        "logit_scale": scale,
        "max_rel_logit_diff": stats["max_abs"] / max(scale, 1e-12),
        "cosine": cosine(ref, test),
        **{k: v for k, v in stats.items() if k != "max_abs"},
    }


def greedy_match(ref_tokens: list[int], test_tokens: list[int]) -> dict:
    """Exact match and the first position where the two token streams differ (None if they never do)."""
    first = None
    for i, (r, t) in enumerate(zip(ref_tokens, test_tokens)):
        if r != t:
            first = i
            break
    if first is None and len(ref_tokens) != len(test_tokens):
        first = min(len(ref_tokens), len(test_tokens))
    return {"exact": first is None, "first_divergence": first, "ref_tokens": len(ref_tokens), "test_tokens": len(test_tokens)}


def greedy_match_with_oracle(ref_tokens: list[int], test_tokens: list[int], oracle_choice: list[int]) -> dict:
    """Greedy tokens judged with the float64 oracle, which tells a real divergence from a near-tie.

    oracle_choice[i] is the oracle's argmax after the prompt + ref_tokens[:i] (teacher-forced over the FP32
    reference's own continuation, so both see the same context). A near-tie is a position where the FP32 reference's
    token and the oracle's choice differ: the top two logits are so close that FP32 rounding decides. The rule:
    - the bundle must equal the FP32 reference token for token;
    - at its first divergence d, it is a near-tie only if d is a near-tie position and the bundle picked the oracle's
      token there (a third token is a failure); the streams then have different contexts, so nothing after d is
      compared (the teacher-forced logits checks still cover every position);
    - a divergence anywhere else, or a length mismatch, fails.
    Before the first near-tie this is exactly "the bundle equals the oracle's own greedy tokens"."""
    n = min(len(ref_tokens), len(oracle_choice))
    near_ties = [{"position": i, "reference": ref_tokens[i], "oracle": oracle_choice[i]}
                 for i in range(n) if ref_tokens[i] != oracle_choice[i]]
    d = greedy_match(ref_tokens, test_tokens)["first_divergence"]
    accepted = (d is not None and d in {t["position"] for t in near_ties} and d < len(test_tokens)
                and test_tokens[d] == oracle_choice[d])
    return {
        "passed": d is None or accepted,
        "near_ties": near_ties,
        "accepted_near_tie": d if accepted else None,
        "first_divergence": d,
        "checked_tokens": len(ref_tokens) if d is None else d + 1,
    }
