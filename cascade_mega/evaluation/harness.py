"""The project's checkpoints as an lm-evaluation-harness model (`lm_eval.api.model.LM`).

- `loglikelihood`: exact for AR checkpoints; for block- and full-diffusion checkpoints minus the
  NELBO, a lower bound on the log-likelihood (`likelihood.nelbo_bounds`), with every choice of
  one question scored under the same noise draws (requests are grouped by context).
  `is_greedy`: AR, whether the argmax at every continuation position is the continuation's token;
  diffusion, whether the project's block decoder, greedy with the run's decoding policy, decodes
  exactly the continuation's tokens from the context (the question `generate_until` would answer).
- `loglikelihood_rolling`: the document in lm-eval's rolling windows of the model's context, each
  scored as a (context, continuation) pair (a sum of bounds for diffusion).
- `generate_until`: the project's decoder (`inference/load.decoder_for`) with the request's
  sampling knobs, cut at the first of its stop strings.
Data parallel: under torchrun every rank takes its share of the requests (lm-eval's `rank` /
`world_size`), gathering through torch.distributed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import List

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from cascade_mega.config.objectives import layout_of
from cascade_mega.evaluation.likelihood import ar_scores, fit, nelbo_bounds
from cascade_mega.inference.policies import Policy
from cascade_mega.inference.sampling import Sampling


class CascadeLM(LM):
    def __init__(self, cfg, tokenizer, model, decoder, mc_samples: int = 32, seed: int = 0,
                 policy: Policy = Policy(), batch: int = 64):
        super().__init__()
        self.cfg, self.tok, self.model, self.decoder = cfg, tokenizer, model, decoder
        self.ar = layout_of(cfg).causal  # exact log-likelihoods, no bound
        self.samples, self.seed, self.policy, self.batch = mc_samples, seed, policy, batch
        self.max_len = cfg.data.seq_len
        if torch.distributed.is_initialized():
            self._rank = torch.distributed.get_rank()
            self._world_size = torch.distributed.get_world_size()

    # lm-eval's hooks for several ranks
    @property
    def device(self):
        from cascade_mega.runtime import device

        return device.current()

    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.stack(parts)

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self):
        if self.world_size > 1:
            torch.distributed.barrier()

    # ------------------------------------------------------------------ tokens
    def _pair(self, context: str, continuation: str):
        """Token ids of (context, continuation), the context's trailing spaces moved to the
        continuation (as lm-eval's Hugging Face model does); an empty context is end-of-text."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tok.encode(continuation)
        return ([self.tok.eod] + ctx) if not ctx else ctx, cont

    # ------------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._scores([self._pair(*r.args) for r in requests])

    def _scores(self, pairs):
        if self.ar:
            return ar_scores(self.model, self.cfg, pairs, self.batch)
        groups = defaultdict(list)  # one question's choices share their noise draws
        for i, (c, x) in enumerate(pairs):
            groups[tuple(c)].append(i)
        out = [None] * len(pairs)
        for ctx, members in groups.items():
            bounds = nelbo_bounds(self.model, self.cfg, self.tok.mask_id, list(ctx),
                                  [pairs[i][1] for i in members], self.samples, self.seed,
                                  self.batch)
            for i, (nelbo, _se) in zip(members, bounds):
                out[i] = -nelbo
        greedy = self._greedy(pairs)
        return [(ll, g) for ll, g in zip(out, greedy)]

    def _greedy(self, pairs) -> List[bool]:
        """Whether greedy block decoding from each context gives exactly its continuation."""
        fitted = [fit(c, x, self.max_len) for c, x in pairs]
        out = []
        for start in range(0, len(fitted), self.batch):
            chunk = fitted[start:start + self.batch]
            by_length = defaultdict(list)  # one budget per generate call
            for i, (c, x) in enumerate(chunk):
                by_length[len(x)].append(i)
            got = [False] * len(chunk)
            for n, members in by_length.items():
                if n == 0:  # an empty continuation: nothing to decode, trivially greedy
                    for i in members:
                        got[i] = True
                    continue
                gens = self.decoder.generate([chunk[i][0] for i in members], n, self.policy,
                                             Sampling())
                for i, g in zip(members, gens):
                    got[i] = g.tokens == chunk[i][1]
            out += got
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        limit = self.max_len if self.ar else self.max_len - 1
        out = []
        for r in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok.encode(r.args[0]), prefix_token=self.tok.eod,
                max_seq_len=limit, context_len=1)]
            out.append(sum(ll for ll, _ in self._scores(
                [(list(c), list(x)) for c, x in windows])))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = min(int(kwargs.get("max_gen_toks", 256)), self.max_len - 1)
            sampling = Sampling(greedy=not kwargs.get("do_sample", False) or
                                not kwargs.get("temperature", 1.0),
                                temperature=float(kwargs.get("temperature") or 1.0),
                                top_p=float(kwargs.get("top_p") or 1.0), seed=self.seed)
            prompt = (self.tok.encode(context) or [self.tok.eod])[-(self.max_len - budget):]
            text = self.decoder.generate([prompt], budget, self.policy, sampling)[0].text
            cuts = [text.index(s) for s in until if s and s in text]
            out.append(text[:min(cuts)] if cuts else text)
        return out
