"""Choosing tokens from logits: greedy, temperature, top-k, top-p, with a seeded generator.

`distribution` applies the knobs (the distribution a token is drawn from), `draw` draws from it;
`sample` does both and also returns each drawn token's probability. The block policies look at
the distributions first (which positions to decide) and draw only the positions they decide
(`policies.decide`), so a decided token's law is the model's distribution at that position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # nucleus mass kept
    seed: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def distribution(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits: [m, V] (forbidden ids already -inf), on any device -> the probabilities [m, V]
    (float32, same device) that a token is drawn from: softmax of the logits over the
    temperature, restricted by top-k and top-p; greedy: the plain softmax (its argmax is drawn)."""
    logits = logits.float()
    if s.greedy:
        return logits.softmax(-1)
    if s.temperature != 1:
        logits = logits / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= s.top_p  # keep the first token always
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def draw(probs: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `distribution`'s output, on the host (where the decoders keep their
    state); greedy: the argmax. generator: a host generator (the uniforms are drawn on the host
    and copied: the same samples on every device)."""
    if s.greedy:
        return probs.argmax(-1).cpu()
    # inverse CDF with one uniform per row, the CDF in float64 (float32 values near 1 are 6e-8
    # apart, which would distort the share of tokens of probability ~1e-7 by tens of percent:
    # low-precision categorical sampling measurably lowers sample entropy); one random number
    # per row instead of one per token id
    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = torch.rand(len(probs), 1, dtype=torch.float64, generator=generator)  # host, on purpose
    u = u.to(cdf.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)
    return tokens.cpu()


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator):
    """logits: [m, V] on any device -> (tokens [m], their probabilities [m]), on the host."""
    probs = distribution(logits, s)
    tokens = draw(probs, s, generator)
    return tokens, probs.gather(1, tokens.to(probs.device)[:, None]).squeeze(1).cpu()
