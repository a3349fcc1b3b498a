"""Unmasking policies: which masked positions of the current block a denoising step decides.

A step looks at each masked position's distribution (the sampling knobs applied) *before* any
token is drawn, picks the positions to decide from those distributions, then draws each picked
position's token from its full distribution, so a decided token's law is the model's
distribution at that position (`decide`). Ranking positions by the probability of a token drawn
at every position first (`order="drawn"`, the selection the project used before) keeps the draws
that happened to land on likely tokens, so frequent tokens win and the samples lose diversity
(unigram entropy, repetition) against AR at equal speed (measured: docs/results.md).

Which positions (`order`): `confidence` (the distribution's largest probability), `margin` (the
two largest apart), `entropy` (lowest first), `random` (uniformly random) or `drawn`. `random`
with `fixed` is MDLM's ancestral sampling only in its order: MDLM's step unmasks each masked
position independently with probability (t - s) / t (a Binomial count), ours decides a fixed
count, ceil(remaining / steps left), at uniformly random positions. At steps = B (one position
per step) ours is exactly the model's own law, which MDLM's reaches only as its steps grow.

How many (`name`):
- `fixed`: K steps per block, ceil(remaining / steps left) each step (BD3-LM).
- `threshold`: every position whose largest probability reaches tau, at least one (Fast-dLLM's
  confidence-aware parallel decoding); tau > 1 decides one token per step.
- `adaptive`: the threshold rule with a cap on steps per block: at step s of at most S it decides
  at least what MaskGIT's cosine schedule asks (a fraction cos(pi/2 s/S) of the block still masked
  after step s), so confident blocks finish in a step or two and hard ones never take more than S
  (CASCADE's per-block step count); at S = 3 a block of 16 goes 3, 6, 7.
- `entropy`: EB-sampler's rule (entropy-bounded unmasking, Ben-Hamu et al. 2025): the longest
  prefix of the positions in `order` whose summed entropy (nats) less its largest stays within
  `bound` (their gamma). The joint entropy of the positions is at least their largest, so
  sum H - max H bounds their total correlation, the dependence that drawing them together from
  their marginals ignores; a single position always passes, and the step count follows the
  model's uncertainty, capped at S steps like `adaptive`. (With H >= 0 the left side only grows
  along `order`, so the admitted positions are a prefix.)
- `tweedie`: the exact reverse step of a score-entropy model (`diffusion.loss = score_entropy`),
  K steps per block on the grid t_k = 1 - k / K, alpha = 1 - t. SEDD's absorbing scores are
  score_y = a exp(logit_y) / (V - 1), a = (1 - t) / t (`model/scores.py`), so the reverse rate
  out of [MASK] at time u is sigma'(u) sum_y score_y = R / u, R = sum_y exp(logit_y) / (V - 1)
  the scores' mass over a. Holding the logits fixed over the step (one forward), a masked
  position survives from t to s with probability exp(-int_s^t R / u du) = (s / t)^R, so it is
  unmasked with probability 1 - (s / t)^R, then y is drawn from the normalised scores (the
  sampling knobs applied). SEDD's analytic sampler (the absorbing process's staggered score)
  unmasks with min(1, R (t - s) / t), the first-order expansion of this step: too often for
  R > 1, too rarely for R < 1 (at t = 1, s = 0.75, R = 2: 0.5 against the exact 0.4375), the
  same at R = 1. A cross-entropy model's normalised prediction is its score (R = 1): the step is
  then (t - s) / t, MDLM's ancestral step. At s = 0 every remaining position is decided.
- `speculative`: not a rule of its own: the policy `draft` (any of the above, with these steps,
  tau, order and bound) drafts each block and the causal clean stream verifies it
  (`inference/speculative.py`; models with `diffusion.clean_stream = causal`).
- `causal`: no diffusion at all: the causal clean stream decoded one token per forward, as an AR
  model (what `speculative` must equal; models with `diffusion.clean_stream = causal`).
A block with fewer positions to decide (a prompt's tail given in it, or the token budget ending
inside it) gets a proportionally lower cap, ceil(S k / B) for k of B positions. At a capped
policy's last step every remaining position is decided.

Remasking (`remask` = p > 0) is deterministic threshold remasking, not ReMDM's posterior
remasking (which sends each decided token back to [MASK] at random, with its schedule's
probability, in a posterior that keeps the forward process's marginals): before the last step of
a capped block, positions this block decided earlier whose probability when decided was below p
go back to [MASK] (the least likely first, fewer than the step decides), to be decided again with
more of the block known; the last step remasks nothing and decides everything, so the budget
always ends decided.

Defaults: `adaptive` with `confidence` order, chosen by `cascade bench generate` on the
quickstart models (docs/benchmarks.md; the measured figures, dated, are in docs/results.md,
"Decoding policies against AR"). Greedy decoding (`cascade generate`'s default) only ranks
positions; when sampling, the measurements favour confidence-first order at few positions per
forward and random order at many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cascade_mega.inference.sampling import Sampling, distribution, draw

POLICIES = ("fixed", "threshold", "adaptive", "entropy", "tweedie", "speculative", "causal")
DRAFTS = POLICIES[:5]  # the policies that can draft for `speculative`
ORDERS = ("confidence", "margin", "entropy", "random", "drawn")


@dataclass
class Policy:
    name: str = "adaptive"
    steps: int = 4  # fixed: steps per block; adaptive / entropy: the cap
    tau: float = 0.9
    order: str = "confidence"
    bound: float = 1.0  # entropy: EB's gamma, sum H - max H (nats) a step may decide
    remask: float = 0.0  # decided positions below this probability may be remasked (0: off)
    draft: str = "fixed"  # speculative: the policy that drafts each block
    redraft: bool = False  # speculative: after a partial acceptance, draft the block again
    # speculative: the most drafted tokens one forward verifies (0: all; 2 measured best on the
    # quickstart's causal-clean-stream model, docs/results.md)
    verify: int = 2

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}; expected one of {', '.join(POLICIES)}")
        if self.name == "speculative":
            if self.draft not in DRAFTS:
                raise ValueError(f"unknown draft policy {self.draft!r}; expected one of "
                                 f"{', '.join(DRAFTS)}")
            if self.verify < 0:
                raise ValueError(f"verify must be >= 0 (0: all), got {self.verify}")
            if self.remask:
                raise ValueError("remasking decides a drafted token by its probability, which "
                                 "speculative verification cannot account for: use remask 0")
            self.draft_policy()  # its own checks
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; expected one of {', '.join(ORDERS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0 (above 1: one position per step), got {self.tau}")
        if self.order == "random" and self.name not in ("fixed", "speculative", "causal"):
            raise ValueError(f"order 'random' decides a fixed count per step: it goes with policy "
                             f"'fixed', not {self.name!r}")
        if self.bound <= 0:
            raise ValueError(f"the entropy bound must be > 0, got {self.bound}")
        if not 0 <= self.remask < 1:
            raise ValueError(f"remask is a probability in [0, 1), got {self.remask}")
        if self.remask and self.name in ("threshold", "tweedie"):
            raise ValueError(f"remasking needs a step budget per block: use it with policy "
                             f"fixed, adaptive or entropy, not {self.name!r}")

    def draft_policy(self) -> "Policy":
        """The policy that drafts a block under `speculative` (the knobs are shared)."""
        return Policy(self.draft, self.steps, self.tau, self.order, self.bound)

    def steps_for(self, positions: int, block: int) -> int:
        """Steps for a block that decides `positions` of its `block` (fixed: K; adaptive and
        entropy: the cap, scaled to the positions; threshold: no limit but one per step)."""
        if self.name in ("adaptive", "entropy"):
            return max(1, math.ceil(self.steps * positions / block))
        return self.steps if self.name in ("fixed", "tweedie") else positions

    def choose(self, confidence: torch.Tensor, step: int, steps: int = 0,
               entropy: torch.Tensor = None, rank: torch.Tensor = None) -> torch.Tensor:
        """confidence: [m] largest probability of each still-masked position; entropy: [m]
        (the `entropy` policy); rank: [m] higher first (default: confidence); steps: this
        block's `steps_for` (default: the policy's steps). Returns the indices to decide."""
        m, steps = confidence.numel(), steps or self.steps
        order = (confidence if rank is None else rank).argsort(descending=True, stable=True)
        if self.name != "threshold" and step + 1 >= steps:
            return order
        if self.name == "fixed":
            return order[:math.ceil(m / max(steps - step, 1))]
        if self.name == "entropy":  # EB-sampler: sum H - max H <= bound along the order
            h = entropy[order].double()
            within = h.cumsum(0) - h.cummax(0).values <= self.bound  # true at the first
            return order[:int(within.int().cumprod(0).sum())]  # its leading run
        count = int((confidence >= self.tau).sum())
        if self.name == "adaptive":
            count = max(count, cosine_floor(m, step, steps))
        return order[:max(count, 1)]

    def to_remask(self, confidence: torch.Tensor, decided: int, step: int,
                  steps: int) -> torch.Tensor:
        """confidence: [d] probabilities of the block's earlier decisions when they were made;
        decided: positions this step decides. Returns the indices to put back to [MASK]."""
        if not self.remask or step + 1 >= steps or decided < 2 or not confidence.numel():
            return torch.zeros(0, dtype=torch.long)
        low = (confidence < self.remask).nonzero().squeeze(1)
        low = low[confidence[low].argsort(stable=True)]
        return low[:decided - 1]


def cosine_floor(m: int, step: int, steps: int) -> int:
    """Positions to decide at `step` (of `steps`) with m masked, so that the masked fraction
    follows cos(pi/2 s/S) from here on; everything at the last step."""
    if step + 1 >= steps:
        return m
    keep = math.cos(math.pi / 2 * (step + 1) / steps) / math.cos(math.pi / 2 * step / steps)
    return m - math.floor(m * keep)


def tweedie_unmask(logits: torch.Tensor, step: int, steps: int, scores: bool) -> torch.Tensor:
    """[m] probability that the exact reverse step of a score model from t = 1 - step / steps to
    s = t - 1 / steps unmasks each of m masked positions, 1 - (s / t)^R (logits [m, V] with -inf
    on ids never predicted)."""
    t, s = 1.0 - step / steps, max(1.0 - (step + 1) / steps, 0.0)
    if not scores:  # a cross-entropy model: R = 1, MDLM's ancestral step (host, as returned)
        return torch.full((logits.shape[0],), (t - s) / t)
    if s == 0:  # (0 / t)^R = 0: everything is decided, even where R underflows
        return torch.ones(logits.shape[0], dtype=torch.float64)  # host, as returned below
    logits = logits.double()
    allowed = torch.isfinite(logits).sum(-1).double()
    mass = (torch.logsumexp(logits, -1) - allowed.log()).exp()  # R
    return (-torch.expm1(mass * math.log(s / t))).cpu()


def decide(policy: Policy, logits: torch.Tensor, sampling: Sampling, generator, step: int,
           steps: int, scores: bool = False):
    """logits: [m, V] of the m still-masked positions (any device); scores: the logits are a
    score-entropy model's (`tweedie` reads their mass). Returns host tensors (chosen indices
    into the m, their tokens, the tokens' probabilities)."""
    probs = distribution(logits, sampling)
    if policy.name == "tweedie":
        p = tweedie_unmask(logits, step, steps, scores)
        # host: the decoder's generator and decisions live there, like `draw`'s
        chosen = (torch.rand(len(p), generator=generator, dtype=torch.float64) < p)
        chosen = chosen.nonzero().squeeze(1)
        picked = probs[chosen.to(probs.device)]
        tokens = draw(picked, sampling, generator)
        return chosen, tokens, \
            picked.gather(1, tokens.to(picked.device)[:, None]).squeeze(1).cpu()
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    confidence = top[:, 0].cpu()
    entropy = rank = None
    if policy.name == "entropy" or policy.order == "entropy":
        logp = probs.clamp_min(1e-30).log()
        entropy = -(probs * logp).sum(-1).cpu()
    if policy.order == "margin":
        rank = (top[:, 0] - top[:, -1]).cpu()
    elif policy.order == "entropy":
        rank = -entropy
    elif policy.order == "random":
        rank = torch.rand(len(probs), generator=generator)  # host generator, like `draw`
    elif policy.order == "drawn":  # every position drawn, ranked by its draw's probability
        tokens = draw(probs, sampling, generator)
        rank = probs.gather(1, tokens.to(probs.device)[:, None]).squeeze(1).cpu()
        chosen = policy.choose(rank, step, steps, entropy)
        return chosen, tokens[chosen], rank[chosen]
    chosen = policy.choose(confidence, step, steps, entropy, rank)
    picked = probs[chosen.to(probs.device)]
    tokens = draw(picked, sampling, generator)
    return chosen, tokens, picked.gather(1, tokens.to(picked.device)[:, None]).squeeze(1).cpu()
