"""Self-speculative decoding: the diffusion stream drafts a block, the causal clean stream checks
it (Nemotron-Labs-Diffusion, TiDAR), for models trained with `diffusion.clean_stream = causal`
and its next-token loss (`diffusion.ar_loss_weight`).

There is one KV cache, the causal stream's: the committed tokens' clean K/V, exactly an AR model's
cache. A round, per sequence, with the tokens before position m decided:
  draft   the aligned block that holds m is denoised by the draft policy (any `Policy`, its steps
          a knob); the block's positions before m are given, the rest drafted. Its noisy rows see
          the cached positions before the block, as in training (`kv_cache.DecodeStep`).
  verify  one forward takes the drafted tokens as clean rows: row j's causal logits give the
          distribution of position j + 1, the newest committed row's that of m. Where the draft
          fills its block, the same forward also runs the first draft step of the next block, on
          the bet that every drafted token is accepted (TiDAR): a round then costs the draft's
          steps and nothing more.
  accept  greedy: the longest prefix equal to the causal stream's argmax, then the causal stream's
          own token there (the correction, or a bonus token after a whole accepted block).
          Sampling: speculative sampling, each drafted token accepted with probability
          min(1, p / q), a rejection drawn from the normalised residual (p - q)+, where p is the
          causal stream's distribution with the sampling knobs applied and q the one the draft
          drew the token from; a whole accepted run adds a bonus token drawn from p.
          `Policy.verify` caps the tokens one forward verifies (acceptance falls with the
          distance from the prefix, and every verified row costs compute).
  cut     the cache keeps the accepted tokens (its length is cut back); the correction or bonus
          token is committed by the next forward.
After a partial acceptance the rest of the draft, past the correction, is verified by the next
forward, the one that commits the correction: no forward drafts again, so a round is one forward
(the draft's steps come only with a new block). `Policy.redraft` instead realigns to the block
holding the correction and drafts it again with its accepted part given (a situation training
covers, one more forward per partial acceptance); which gives more tokens per second is measured
by `cascade bench generate` (docs/results.md). A draft never starts inside its block: a noisy
window beginning at the correction would see a clean prefix ending inside its own block, which
no training mask has.

Exactness. Greedy output is the causal stream's greedy decoding, token for token. Sampled output
follows the causal stream's distribution exactly, for any temperature, top-k or top-p: the
acceptance rule is exact when the drafted token d_j was drawn from q_j given the drafted tokens
left of it, which holds when no position left of j was decided at a later draft step (the
policies choose positions from distributions before drawing, `policies.py`; the rule counts
the draft's rejected positions too, whose correction then stands in them). A token decided
before some position left of it (or by the `drawn` order) is checked as a fixed draft (q one-hot
at it: accepted with probability p(d_j), a rejection drawn from p without d_j), which is exact
for any draft.

Policy `causal` runs the same rounds with nothing drafted: each forward commits one token and
the causal stream's next one is drawn from its row (the model as the AR model it contains).

Part of the decoding core (`inference/network.py`): an exported model runs this file as it is.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional

import torch

from cascade_mega.inference.decode import (OTHER_DECODERS, Decoder, Generation, GenerationError,
                                           check_request)
from cascade_mega.inference.kv_cache import CLEAN, IDLE, NOISY, DecodeStep, KVCache, to_device
from cascade_mega.inference.policies import decide
from cascade_mega.inference.sampling import distribution, draw, sample


class _Seq:
    def __init__(self, prompt: List[int], B: int, mask_id: int):
        self.out = Generation(prompt=list(prompt))
        self.tokens = list(prompt)  # every decided position (committed or pending)
        self.pending = list(prompt)  # decided, to be committed by the next forward
        self.last = None  # logits of the newest committed row: position len(tokens)'s law
        self.done = False
        self.B, self.mask_id = B, mask_id
        self.x = None  # the block being drafted (host), positions start .. start + B - 1
        self.ready = False  # its draft is complete: the next forward verifies it
        self.fused = None  # noisy-row logits of the next block, from the verifying forward

    @property
    def m(self) -> int:  # the first position not yet decided
        return len(self.tokens)


class SpeculativeDecoder(Decoder):
    """The block decoder's network, cache and bookkeeping; rounds of draft, verify, accept."""

    def check_policy(self, policy):
        self._check(policy)

    def _check(self, policy):
        if self.ar:
            raise GenerationError(f"--policy {policy.name} reads the causal clean stream of a "
                                  "block-diffusion model; an AR checkpoint is decoded as AR by "
                                  "any other policy")
        if not (self.net.clean_stream == "causal" and self.net.ar_trained):
            raise GenerationError(
                f"--policy {policy.name} needs a causal clean stream trained for next-token "
                "prediction (diffusion.clean_stream=causal with diffusion.ar_loss_weight > 0); "
                f"this model has a {self.net.clean_stream} clean stream" +
                ("" if self.net.clean_stream != "causal" else " never trained for it"))

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=128, policy=None, sampling=None, stream=None):
        from cascade_mega.inference.sampling import Sampling

        check_request(prompts, self.max_len, max_new_tokens)
        self.max_new, self.sampling = max_new_tokens, sampling or Sampling()
        self.policy = policy
        self.draft = policy.draft_policy() if policy.name == "speculative" else None
        self.gen = torch.Generator().manual_seed(self.sampling.seed)
        with self.net.decoding():
            self.cache = KVCache(len(prompts), self.max_len)
            seqs = [_Seq(p, self.B, self.net.mask_id) for p in prompts]
            for s in seqs if self.draft is not None else ():
                self._start_draft(s)
            while not all(s.done for s in seqs):
                self._round(seqs, stream)
            for s in seqs:
                s.out.text = self.net.detokenize(s.out.tokens)
        return [s.out for s in seqs]

    # ------------------------------------------------------------------ drafting
    def _start_draft(self, s: _Seq, given_from: Optional[int] = None):
        """The draft of the aligned block holding position m; its decided positions given."""
        B, m = self.B, s.m
        room = self.max_new - len(s.out.tokens)
        if m >= self.max_len or room <= 0:
            s.done, s.out.stopped = True, s.out.stopped or "length"
            return
        s.start = m // B * B
        s.end = min(s.start + B, self.max_len, m + room)  # positions [m, end) are drafted
        s.x = torch.full((B,), self.net.mask_id, dtype=torch.long)  # host bookkeeping
        s.x[:m - s.start] = torch.tensor(s.tokens[s.start:m], dtype=torch.long)
        s.step_of = torch.full((B,), -1, dtype=torch.long)  # the draft step deciding each
        s.q = {}  # position -> the distribution its drafted token was drawn from (sampling)
        s.steps, s.cap = 0, self.draft.steps_for(s.end - m, B)
        s.draft_from, s.reported = m, 0
        s.ready = False

    def _draft_step(self, s: _Seq, rows: torch.Tensor):
        """One policy step over the block's masked positions; rows: their logits [k, V]."""
        masked = (s.x[:s.end - s.start] == self.net.mask_id).nonzero().squeeze(1)
        chosen, tokens, _ = decide(self.draft, rows, self.sampling, self.gen, s.steps, s.cap,
                                   self.net.scores)
        where = masked[chosen]
        s.x[where], s.step_of[where] = tokens, s.steps
        if not self.sampling.greedy and self.draft.order != "drawn":
            probs = distribution(rows[chosen.to(rows.device)], self.sampling)
            s.q.update({s.start + r: probs[j] for j, r in enumerate(where.tolist())})
        s.steps += 1
        s.ready = not bool((s.x[:s.end - s.start] == self.net.mask_id).any())

    # ------------------------------------------------------------------ one forward
    def _round(self, seqs: List[_Seq], stream):
        B, mask_id = self.B, self.net.mask_id
        plan = []
        for s in seqs:
            clean, noisy = [], None  # (token, position) rows; noisy: (tokens, start)
            if not s.done:
                first = s.m - len(s.pending)
                clean = [(t, first + j) for j, t in enumerate(s.pending)]
                if self.draft is None:  # policy causal: one token per forward
                    pass
                elif s.ready:  # verify the draft; bet on it for the next block's first step
                    stop = min(s.end, s.m + self.policy.verify) if self.policy.verify else s.end
                    drafted = s.x[s.m - s.start:stop - s.start].tolist()
                    clean += [(t, s.m + j) for j, t in enumerate(drafted)]
                    if stop == s.end == s.start + B and s.end + B <= self.max_len and \
                            len(s.out.tokens) + len(drafted) + 1 < self.max_new:
                        noisy = (torch.full((B,), mask_id, dtype=torch.long), s.end)
                else:
                    noisy = (s.x, s.start)
            plan.append((clean, noisy))
        width = max(len(c) for c, _ in plan)
        n = width + (B if any(nz is not None for _, nz in plan) else 0)
        b = len(seqs)
        ids = torch.full((b, n), mask_id, dtype=torch.long)  # host: laid out, then one copy
        pos = torch.zeros((b, n), dtype=torch.long)
        kinds = torch.full((b, n), IDLE, dtype=torch.long)
        levels = torch.zeros((b, n))
        for i, (clean, noisy) in enumerate(plan):
            if clean:
                ids[i, :len(clean)] = torch.tensor([t for t, _ in clean])
                pos[i, :len(clean)] = torch.tensor([p for _, p in clean])
                kinds[i, :len(clean)] = CLEAN
            if noisy is not None:
                ids[i, width:], pos[i, width:] = noisy[0], torch.arange(noisy[1], noisy[1] + B)
                kinds[i, width:] = NOISY
                levels[i, width:] = (noisy[0] == mask_id).float().mean()
        # the output layer runs only on the rows read: the newest committed row, the verified
        # rows, and the noisy rows that predict a position still to draft (all, when fused)
        need = set()
        for s, (clean, noisy) in zip(seqs, plan):
            if clean:
                need |= set(range(len(s.pending) - 1 if s.pending else len(s.pending),
                                  len(clean)) if s.ready else [len(clean) - 1])
            if noisy is not None:
                need |= set(range(width, n))
        cols = sorted(need)
        where = {c: j for j, c in enumerate(cols)}
        step = DecodeStep(self.cache, kinds, pos, B, self.net.flex, self.net.clean_stream)
        levels = levels if self.net.time_conditioning else None
        ids, pos_d, cols_t, levels = to_device((ids, pos, torch.tensor(cols), levels),
                                               self.net.device)
        logits = self.net.logits(ids, pos_d, step, cols_t, levels)
        step.commit()
        self.forwards += 1
        def rows(i, first, last):  # logits of sequence i's rows first .. last - 1
            return logits[i, where[first]:where[first] + last - first] if last > first else \
                logits[i, :0]

        for i, (s, (clean, noisy)) in enumerate(zip(seqs, plan)):
            if s.done:
                continue
            committed = len(s.pending)
            if committed:
                s.last = logits[i, where[committed - 1]]
                s.pending = []
            if self.draft is None:
                self._causal_step(s, i, stream)
            elif s.ready:
                self._verify(s, i, rows(i, committed, len(clean)),
                             rows(i, width, n) if noisy is not None else None, stream)
            else:
                self._draft_step(s, self._draft_rows(s, rows(i, width, n)))

    def _causal_step(self, s: _Seq, i: int, stream):
        """Policy `causal`: the next token from the newest committed row."""
        if s.m >= self.max_len:
            s.done, s.out.stopped = True, "length"
            return
        token = int(sample(s.last[None], self.sampling, self.gen)[0][0])
        s.tokens.append(token)
        self._finish(s, [token], stream, i)
        s.pending, s.last = [token], None

    def _draft_rows(self, s: _Seq, rows: torch.Tensor) -> torch.Tensor:
        """The logits of the block's masked positions, from its noisy rows [B, V] (shifted
        prediction: position r from row r - 1, the block's first from the clean row before)."""
        masked = (s.x[:s.end - s.start] == self.net.mask_id).nonzero().squeeze(1)
        if not self.shifted:
            return rows[masked.to(rows.device)]
        out = rows[(masked - 1).clamp(min=0).to(rows.device)]
        if int(masked[0]) == 0:
            out[0] = s.last  # the clean row before the block predicts its first position
        return out

    # ------------------------------------------------------------------ verify and accept
    def _verify(self, s: _Seq, i: int, rows: torch.Tensor, fused, stream):
        m = s.m
        drafted = s.x[m - s.start:m - s.start + rows.shape[0]]  # the verified part
        causal = torch.cat([s.last[None], rows])  # law of positions m .. end (end: the bonus)
        k = len(drafted)
        if self.sampling.greedy:
            best = causal.argmax(-1).cpu()
            agree = (best[:k] == drafted).int()
            a = int(agree.cumprod(0).sum())
            extra = int(best[a])
        else:
            a, extra = self._speculative_sampling(s, drafted, causal)
        s.out.speculation.append({"offset": m - s.start, "drafted": k, "accepted": a,
                                  "steps": s.steps - s.reported})
        s.reported = s.steps
        self.cache.lengths[i] = m + a  # the rejected drafts' K/V are cut from the cache
        new = drafted[:a].tolist()
        bonus_at = m + a
        if bonus_at >= self.max_len:  # a whole block accepted at the end of the context
            extra = None
        new += [extra] if extra is not None else []
        s.tokens += new
        self._finish(s, new, stream, i)
        if s.done:
            return
        s.pending = [extra] if extra is not None else []
        s.last = None
        if s.m < s.end and (a == k or not self.policy.redraft):
            # the rest of the draft is verified by the next forward, after the correction or
            # bonus token, which is given in its place: no forward drafts again (see the
            # module docstring)
            s.x[m + a - s.start] = extra
            return
        self._start_draft(s)
        if s.done or fused is None or a < k:
            return
        # every drafted token accepted: the verifying forward's noisy rows drafted this block
        # (its first position was [MASK] there; it is the bonus token now, given)
        if self.shifted:  # position r from row r - 1: the bonus' row is in the next forward
            rows = fused[(torch.arange(1, self.B) - 1).to(fused.device)]
        else:
            rows = fused[1:]
        self._draft_step(s, rows[:s.end - s.m])

    def _speculative_sampling(self, s: _Seq, drafted: torch.Tensor, causal: torch.Tensor):
        """(accepted count, the next token) by speculative sampling; see the module docstring."""
        m = s.m
        p = distribution(causal, self.sampling).double()  # [k + 1, V] on the device
        steps = s.step_of[s.draft_from - s.start:s.end - s.start]  # the whole draft's
        for j, d in enumerate(drafted.tolist()):
            at = m + j - s.draft_from
            exact_q = (m + j) in s.q and bool((steps[:at] <= steps[at]).all())
            pj = p[j]
            if exact_q:
                q = s.q[m + j].double()
                ratio = float(pj[d]) / float(q[d])
                residual = (pj - q).clamp(min=0)
            else:  # a fixed draft: q one-hot at d
                ratio = float(pj[d])
                residual = pj.clone()
                residual[d] = 0
            u = float(torch.rand((), dtype=torch.float64, generator=self.gen))
            if u < min(1.0, ratio):
                continue
            if float(residual.sum()) <= 0:  # p equals q there: a rejection has no mass
                continue
            return j, int(draw((residual / residual.sum())[None].float(), replace(
                self.sampling, top_k=0, top_p=1.0, temperature=1.0), self.gen)[0])
        return len(drafted), int(draw(p[-1:].float(), replace(
            self.sampling, top_k=0, top_p=1.0, temperature=1.0), self.gen)[0])


OTHER_DECODERS.update(speculative=SpeculativeDecoder, causal=SpeculativeDecoder)
