"""Decoding full-diffusion checkpoints (B = L, LLaDA-style) with Fast-dLLM's approximate KV cache.

The canvas is the prompt followed by max_new [MASK] tokens (at most the model's context). It is
decided left to right in decoding blocks of `block` tokens (semi-autoregressive, as LLaDA and
Fast-dLLM do); in a block each forward decides the positions the policy picks (`threshold`:
Fast-dLLM's confidence-parallel rule; `fixed` and `adaptive` as for block decoding).

Attention is bidirectional over the whole canvas, so no cache is exact: the prefix's K/V change
whenever a later token is decided. Fast-dLLM's approximation, `cache=`:
  none    every forward runs the whole canvas (exact; the reference the others approximate)
  prefix  the first forward of each block runs the whole canvas and fills the cache; the block's
          next forwards run the block and everything after it, attending the cached prefix
  dual    as prefix, and the suffix after the block is cached too: the next forwards run only
          the block's rows, attending the cached prefix and suffix
The first forward of a block is also its first denoising step.

Classifier-free guidance (SMDM), `guidance=g > 0`: every forward also runs the unconditional
canvas (the prompt replaced by [MASK]) as a second batch row with its own cache, and positions
are decided from (1 + g) logits_cond - g logits_uncond.

Prompts are decoded one after the other (a canvas per prompt); stopping is per prompt, at the
first end-of-document of a decided block.

Part of the decoding core: the model is a `Network` (`inference/network.py`), and an exported
full-diffusion model runs this file as it is.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from cascade_mega.diffusion.masks import masked_share
from cascade_mega.inference.decode import BlockStats, Generation, GenerationError, check_request
from cascade_mega.inference.kv_cache import to_device
from cascade_mega.inference.policies import Policy, decide
from cascade_mega.inference.sampling import Sampling

CACHES = ("none", "prefix", "dual")


class CanvasStep:
    """One forward over canvas rows [start, end) of `total`: the keys are the cache with those rows
    replaced by this forward's K/V. `fill` (a forward over the whole canvas) refills the cache."""

    kind = "decode"

    def __init__(self, cache: dict, start: int, end: int, total: int, fill: bool):
        self.cache, self.start, self.end, self.total, self.fill = cache, start, end, total, fill

    def attend(self, layer: int, q, k, v, scale=None, kernel: str = "sdpa"):
        """SDPA whatever the layer's kernel (the canvas is unmasked)."""
        if self.fill:
            self.cache[layer] = (k, v)
            keys, values = k, v
        else:
            ck, cv = self.cache[layer]
            s, e, t = self.start, self.end, self.total
            keys = torch.cat([ck[:, :, :s], k, ck[:, :, e:t]], dim=2)
            values = torch.cat([cv[:, :, :s], v, cv[:, :, e:t]], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


class FullDiffusionDecoder:
    def __init__(self, net, cache: str = "dual", block: int = 32, guidance: float = 0.0):
        if cache not in CACHES:
            raise GenerationError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
        if block < 1:
            raise GenerationError(f"the decoding block must be >= 1 token, got {block}")
        if guidance < 0:
            raise GenerationError(f"guidance must be >= 0, got {guidance}")
        self.net, self.cache_mode, self.block, self.guidance = net, cache, block, guidance
        self.shifted, self.max_len = net.shifted, net.max_len
        self.forwards = 0
        self.rows = 0  # canvas rows run through the model (what the cache saves)

    def _forward(self, canvas: torch.Tensor, start: int, end: int, fill: bool, rows):
        """Logits [b, len(rows), V] of canvas rows `rows` (absolute positions) from a forward over
        [start, end) (the whole canvas when `fill`)."""
        total = canvas.shape[1]
        lo, hi = (0, total) if fill else (start, end)
        pos = torch.arange(lo, hi).expand(canvas.shape[0], hi - lo)
        step = CanvasStep(self.kv, lo, hi, total, fill)
        self.forwards += 1
        self.rows += (hi - lo) * canvas.shape[0]
        # the canvas lives on the host (the decisions are made there); its rows cross per forward
        levels = None  # time conditioning: the canvas's masked share (the canvas is one block)
        if self.net.time_conditioning:
            levels = masked_share(canvas, self.net.mask_id, total)[:, lo:hi]
        ids, pos, rows, levels = to_device((canvas[:, lo:hi], pos, torch.as_tensor(rows) - lo,
                                            levels), self.net.device)
        return self.net.logits(ids, pos, step, rows, levels)

    def _block_logits(self, canvas, start, end, first: bool, stale_first):
        """Logits [b, end - start, V] predicting the block's positions."""
        shift = int(self.shifted)  # position p from row p - 1
        rows = list(range(start - shift, end - shift))
        if first or self.cache_mode == "none":
            return self._forward(canvas, 0, 0, True, rows)
        hi = end if self.cache_mode == "dual" else canvas.shape[1]
        if not shift:
            return self._forward(canvas, start, hi, False, rows)
        # the block's first position from the prefix's last row, kept from the filling forward
        rest = self._forward(canvas, start, hi, False, rows[1:]) if rows[1:] else \
            stale_first[:, :0]
        return torch.cat([stale_first, rest], dim=1)

    def check_policy(self, policy: Policy) -> None:
        if policy.name in ("speculative", "causal"):
            raise GenerationError(f"--policy {policy.name} reads a causal clean stream; a "
                                  "full-diffusion model (block size = context) has no clean "
                                  "stream")

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], max_new_tokens: int = 128,
                 policy: Policy = Policy("threshold"), sampling: Sampling = Sampling(),
                 stream: Optional[Callable[[int, List[int]], None]] = None) -> List[Generation]:
        check_request(prompts, self.max_len, max_new_tokens)
        self.check_policy(policy)
        gen = torch.Generator().manual_seed(sampling.seed)
        with self.net.decoding():
            return [self._one(p, min(max_new_tokens, self.max_len - len(p)), policy, sampling,
                              gen, (lambda toks, i=i: stream(i, toks)) if stream else None)
                    for i, p in enumerate(prompts)]

    def _one(self, prompt, max_new, policy, sampling, gen, stream) -> Generation:
        mask_id, eod, P = self.net.mask_id, self.net.eod, len(prompt)
        out = Generation(prompt=list(prompt))
        canvas = torch.tensor(prompt + [mask_id] * max_new)[None]
        if self.guidance > 0:  # the unconditional canvas: the prompt masked out
            uncond = canvas.clone()
            uncond[0, :P] = mask_id
            canvas = torch.cat([canvas, uncond])
        self.kv = {}
        for start in range(P, P + max_new, self.block):
            end = min(start + self.block, P + max_new)
            steps, stale_first = 0, None
            conf = torch.ones(end - start)  # each decided position's probability when decided
            cap = policy.steps_for(end - start, self.block)
            while bool((canvas[0, start:end] == mask_id).any()):
                logits = self._block_logits(canvas, start, end, steps == 0, stale_first)
                if self.shifted and steps == 0:
                    stale_first = logits[:, :1]
                if self.guidance > 0:
                    g, cond = self.guidance, logits[:1]  # forbidden ids stay -inf
                    logits = torch.where(cond.isinf(), cond, (1 + g) * cond - g * logits[1:])
                masked = (canvas[0, start:end] == mask_id).nonzero().squeeze(1)
                chosen, tokens, confidence = decide(policy, logits[0, masked.to(logits.device)],
                                                    sampling, gen, steps, cap, self.net.scores)
                mine = torch.arange(start, end)
                mine = mine[canvas[0, start:end] != mask_id]
                back = mine[policy.to_remask(conf[mine - start], len(chosen), steps, cap)]
                canvas[:, start + masked[chosen]] = tokens
                conf[masked[chosen]] = confidence
                canvas[:, back] = mask_id
                steps += 1
            decided = canvas[0, start:end].tolist()
            out.blocks.append(BlockStats(index=len(out.blocks), steps=steps, tokens=end - start))
            ended = eod in decided
            new = decided[:decided.index(eod)] if ended else decided
            out.tokens += new
            if stream and new:
                stream(new)
            if ended:
                out.stopped = "eod"
                break
        out.stopped = out.stopped or "length"
        out.text = self.net.detokenize(out.tokens)
        return out
