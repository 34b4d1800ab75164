"""Information-theoretic quantities of discrete distributions, shared by the format and specialist metrics.

Distributions are numpy arrays whose last axis holds the probabilities (rows sum to 1). Logarithms are
natural (nats) unless a function says otherwise; 0 log 0 = 0 (Cover & Thomas, Elements of Information
Theory, 2nd ed., ch. 2).
"""

from __future__ import annotations

import numpy as np


def _plogp(p: np.ndarray, base: float) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)) / np.log(base), 0.0)


def entropy(p: np.ndarray, base: float = np.e) -> np.ndarray:
    """Shannon entropy H(p) = -sum_i p_i log p_i over the last axis (nats by default; base=2 for bits)."""
    return 0.0 - _plogp(p, base).sum(axis=-1)  # 0.0 - x: never -0.0


def normalised_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) / ln K with K the number of categories (length of the last axis), in [0, 1]; 0 when K = 1."""
    categories = np.asarray(p).shape[-1]
    return entropy(p) / np.log(categories) if categories > 1 else np.zeros(np.asarray(p).shape[:-1])


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits, in [0, 1]: JS(p, q) = H2(m) - (H2(p) + H2(q)) / 2, m = (p + q) / 2
    (Lin 1991, "Divergence measures based on the Shannon entropy")."""
    m = (np.asarray(p) + np.asarray(q)) / 2
    return np.clip(entropy(m, 2) - (entropy(p, 2) + entropy(q, 2)) / 2, 0.0, 1.0)


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total variation distance TV(p, q) = 1/2 sum_i |p_i - q_i|, in [0, 1]. For any vector, half its L1 norm."""
    return np.abs(np.asarray(p) - np.asarray(q)).sum(axis=-1) / 2


def mutual_information_bits(joint: np.ndarray) -> float:
    """I(X; Y) = sum_xy p(x, y) log2(p(x, y) / (p(x) p(y))) in bits, from a 2-D table of joint counts or
    probabilities (normalised here); 0 for an empty table. Equals H(X) + H(Y) - H(X, Y)."""
    joint = np.asarray(joint, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint / total
    return float(max(entropy(p.sum(axis=1), 2) + entropy(p.sum(axis=0), 2) - entropy(p.ravel(), 2), 0.0))
