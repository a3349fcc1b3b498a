"""Scaling laws: L(N, D) = E + A / N^alpha + B / D^beta, fitted per objective.

The fit follows Hoffmann et al. (2022, Chinchilla, approach 3): in log space,
log L = LSE(a - alpha log N, b - beta log D, e) with A = exp(a), B = exp(b), E = exp(e), minimising
the Huber loss (delta 1e-3) of the log residuals with L-BFGS-B from a grid of starts, so that one
bad run does not drag the curve. Confidence intervals come from the bootstrap: runs resampled
with replacement, refitted (starting from the full fit and two of the grid's starts), 2.5 and 97.5
percentiles.

Compute: a run's FLOPs are counted by `diffusion/flops.py` (honest for the 2L layout); per objective,
FLOPs per training token are fitted as c(N) = k1 N + k0 (the read-out and attention do not scale
with N), so a budget C buys D = C / c(N) tokens. The compute-optimal frontier is
L*(C) = min_N L(N, C / c(N)); the compute multiplier of an objective at AR's loss l is
C_obj(l) / C_ar(l), where C(l) inverts the frontier (infinite when the objective's E is above l).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

DELTA = 1e-3
NAMES = ("E", "A", "alpha", "B", "beta")
WELL_DETERMINED = 2 * len(NAMES)  # fewer runs than this: the law is named as barely determined


@dataclass
class Law:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    k1: float = 6.0  # FLOPs per token per parameter
    k0: float = 0.0  # FLOPs per token not counted in N
    ci: Dict[str, tuple] = field(default_factory=dict)  # name -> (low, high)
    points: int = 0
    boot: List["Law"] = field(default_factory=list, repr=False)

    @property
    def warning(self) -> Optional[str]:
        """Why this law should not be trusted far, or None."""
        if self.points < WELL_DETERMINED:
            return (f"{self.points} runs for the law's {len(NAMES)} parameters: barely "
                    f"determined (its intervals and every extrapolation are loose; "
                    f"{WELL_DETERMINED} or more runs determine it)")
        return None

    def frontier_band(self, C, q=(2.5, 97.5)):
        """The bootstrap's (low, high) percentiles of the frontier loss at each budget C, or
        None without bootstrap fits."""
        if not self.boot:
            return None
        curves = np.stack([b.frontier(C)[0] for b in self.boot[:100]])
        return np.percentile(curves, q[0], axis=0), np.percentile(curves, q[1], axis=0)

    def loss(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def flops_per_token(self, N):
        return self.k1 * np.asarray(N, float) + self.k0

    def frontier(self, C, n_range=(1e3, 1e13)):
        """(loss, N, D) of the compute-optimal model for each budget C."""
        C = np.atleast_1d(np.asarray(C, float))
        Ns = np.logspace(math.log10(n_range[0]), math.log10(n_range[1]), 600)
        D = C[:, None] / self.flops_per_token(Ns)[None, :]
        L = self.E + self.A / Ns[None, :] ** self.alpha + self.B / D ** self.beta
        i = np.argmin(L, axis=1)
        rows = np.arange(len(C))
        return L[rows, i], Ns[i], D[rows, i]

    def compute_for(self, loss: float, lo=1e6, hi=1e30) -> float:
        """The compute whose frontier loss is `loss` (inf when the law never gets there)."""
        if self.frontier(hi)[0][0] > loss:
            return math.inf
        a, b = math.log(lo), math.log(hi)
        for _ in range(100):
            m = (a + b) / 2
            if self.frontier(math.exp(m))[0][0] > loss:
                a = m
            else:
                b = m
        return math.exp((a + b) / 2)


def _huber(r):
    a = np.abs(r)
    return np.where(a <= DELTA, 0.5 * r * r, DELTA * (a - 0.5 * DELTA))


def _objective(theta, logN, logD, logL):
    e, a, alpha, b, beta = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    s = w.sum(axis=0)
    r = top + np.log(s) - logL
    w = w / s
    g = np.clip(r, -DELTA, DELTA)  # Huber's derivative
    grad = np.array([(g * w[2]).sum(), (g * w[0]).sum(), -(g * w[0] * logN).sum(),
                     (g * w[1]).sum(), -(g * w[1] * logD).sum()])
    return _huber(r).sum(), grad


BOUNDS = [(-10, 10), (-20, 60), (0.0, 3.0), (-20, 60), (0.0, 3.0)]
GRID = list(itertools.product((-1.0, 0.0, 1.0), (0.0, 5.0, 10.0), (0.2, 0.5, 1.0),
                              (0.0, 5.0, 10.0), (0.2, 0.5, 1.0)))


def _fit_theta(logN, logD, logL, starts) -> np.ndarray:
    from scipy.optimize import minimize

    best, best_val = None, math.inf
    for x0 in starts:
        res = minimize(_objective, np.asarray(x0, float), args=(logN, logD, logL), jac=True,
                       method="L-BFGS-B", bounds=BOUNDS)
        if res.fun < best_val:
            best, best_val = res.x, res.fun
    return best


def _law(theta) -> Law:
    e, a, alpha, b, beta = theta
    return Law(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta))


def fit_law(N, D, L, C=None, bootstrap: int = 200, seed: int = 0) -> Law:
    """Fit L(N, D) to runs (arrays of parameters, tokens, final loss; C: their FLOPs)."""
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    if len(N) < 5 or len(set(N)) < 2 or len(set(D)) < 2:
        raise ValueError(f"{len(N)} runs over {len(set(N))} model sizes and {len(set(D))} token "
                         "budgets: a fit needs at least 5 runs, 2 sizes and 2 budgets")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    theta = _fit_theta(logN, logD, logL, GRID)
    law = _law(theta)
    law.points = len(N)
    if C is not None:
        law.k1, law.k0 = _flops_per_token(N, np.asarray(C, float) / D)
    rng = np.random.default_rng(seed)
    starts = [theta, GRID[len(GRID) // 2], GRID[-1]]
    for _ in range(bootstrap):
        idx = rng.integers(0, len(N), len(N))
        if len(set(N[idx])) < 2 or len(set(D[idx])) < 2:
            continue
        b = _law(_fit_theta(logN[idx], logD[idx], logL[idx], starts))
        b.k1, b.k0 = law.k1, law.k0
        law.boot.append(b)
    if law.boot:
        for name in NAMES:
            vals = np.array([getattr(b, name) for b in law.boot])
            law.ci[name] = (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5)))
    return law


def _flops_per_token(N, per_token) -> tuple:
    """Least squares c = k1 N + k0 with k1, k0 >= 0 (k0 alone when every run has one size)."""
    if len(set(N)) < 2:
        return 0.0, float(np.median(per_token))
    k1, k0 = np.polyfit(N, per_token, 1)
    if k0 < 0:
        return float(np.sum(per_token * N) / np.sum(N * N)), 0.0
    return float(max(k1, 0.0)), float(k0)


def multiplier(law: Law, ar: Law, compute: float) -> tuple:
    """(compute multiplier of `law` to reach AR's frontier loss at `compute`, 95% interval)."""
    target = ar.frontier(compute)[0][0]
    value = law.compute_for(target) / compute
    pairs = list(zip(law.boot, ar.boot))[:100]
    if not pairs:
        return value, None
    samples = [b.compute_for(a.frontier(compute)[0][0]) / compute for b, a in pairs]
    # 'nearest' keeps an infinite sample (never reaches AR's loss) out of any interpolation
    return value, tuple(float(np.percentile(samples, q, method="nearest")) for q in (2.5, 97.5))


def fit_objectives(results: List[dict], bootstrap: int = 200) -> Dict[str, object]:
    """Per objective label: a Law, or the reason it could not be fitted (a string)."""
    out: Dict[str, object] = {}
    for label in sorted({r["label"] for r in results}):
        rows = [r for r in results if r["label"] == label]
        try:
            out[label] = fit_law([r["params"] for r in rows], [r["tokens"] for r in rows],
                                 [r["loss"] for r in rows], [r["flops"] for r in rows],
                                 bootstrap=bootstrap)
        except ValueError as err:
            out[label] = str(err)
    return out


def reference_compute(results: List[dict]) -> Optional[float]:
    return max((r["flops"] for r in results), default=None)
