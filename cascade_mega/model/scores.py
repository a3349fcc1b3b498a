"""Score entropy (SEDD, Lou et al. 2024) on the absorbing process, as a correction to the CE.

A score-entropy model's outputs are positive scores s_y (unnormalised) for every masked position,
estimating the concrete-score ratios p_t(x with y at i) / p_t(x with [MASK] at i). For the
absorbing process with t the masking probability, the true ratio is a q(y | unmasked context) with
a = (1 - t) / t, and the denoising score entropy of a masked position whose clean token is x0,
with the weight that makes it a NELBO term (1 / (1 - t)), is

    DSE = 1/(1-t) [ sum_y s_y - a log s_x0 + a log a - a ]          (SEDD's three terms, K = a log a - a)
        = (1/t) [ CE(q)_x0 + g(Z / a) ],   q = s / Z,  Z = sum_y s_y,  g(r) = r - 1 - log r >= 0,

the second form free of the cancellation the first suffers as t -> 0. The scores are SEDD's
absorbing parameterisation, log s_y = logit_y + log a - log(V - 1) (V - 1 the tokens that are not
[MASK] and vocabulary padding): the known time scale a is built in, so Z / a = sum_y exp(logit_y) / (V - 1) needs no
time input, and g(Z / a) is what this module adds to a position's cross-entropy before the
objective's 1/t weight. RADD's identity: with s = a softmax(logits), Z = a and g = 0, so DSE is
exactly the 1/t-weighted CE; any other normalisation only adds g > 0 (the bound is looser).

Under tensor parallelism each rank holds a slice of the vocabulary: the log-sum-exp is reduced
over the tensor-parallel group (max, then the sum of exponentials), as the cross-entropy is.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state, tensor_parallel


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log sum_y exp(logits_y) over the whole vocabulary; [..., v/tp] -> [...]."""
    group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    peak = logits.detach().max(dim=-1).values
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(peak, torch.distributed.ReduceOp.MAX, group=group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = (logits - peak[..., None]).exp().sum(dim=-1)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        total = tensor_parallel.reduce_from_tensor_model_parallel_region(total)
    return peak + total.log()


def excess(lse: torch.Tensor, offset: float) -> torch.Tensor:
    """g(Z / a) = r - 1 - log r at log r = lse - offset (offset = log(V - 1)); >= 0, 0 iff r = 1."""
    log_r = lse - offset
    return torch.expm1(log_r) - log_r


def offset(output_layer) -> float:
    """log(V - 1), V - 1 = the ids a masked position can take: those the output layer's bias
    (this rank's slice; 0 where allowed, -inf for [MASK] and vocabulary padding) allows.
    Counted (and reduced over the tensor-parallel ranks) once per layer, not once per step."""
    cached = getattr(output_layer, "_score_offset", None)
    if cached is not None:
        return cached
    allowed = torch.isfinite(output_layer.logit_bias).sum().double()
    group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(allowed, group=group)
    output_layer._score_offset = math.log(float(allowed))
    return output_layer._score_offset


def dse_three_terms(scores: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SEDD's denoising score entropy of a masked position as written (the reference the stable
    form is tested against): scores [n, V] > 0, x0 [n] clean ids, t [n] -> [n]."""
    a = (1 - t) / t
    s_x0 = scores.gather(1, x0[:, None])[:, 0]
    return (scores.sum(1) - a * s_x0.log() + a * a.log() - a) / (1 - t)
