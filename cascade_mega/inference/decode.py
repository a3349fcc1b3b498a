"""Block-by-block generation with an exact KV cache; AR decoding of `ar` checkpoints.

Block decoding (B < L): the prompt's whole blocks are committed to the cache by one forward; then
each block is denoised by forwards over that block only (its B rows attend the cache), the policy
deciding some masked positions per forward, until none is left. The decided block is committed by
the next forward, which is also the first denoising step of the following block, so a block costs
exactly its number of denoising steps. A prompt that ends inside a block starts that block with
its tokens given (like x_t with those tokens kept). Where the token budget ends inside a block,
only the positions within it are decided (the others stay [MASK], as in any x_t); the policy's
step count for a block follows the positions it decides (`Policy.steps_for`).

Why not reuse the last denoising step's K/V: that forward ran with the tokens it decided still
[MASK] in its input, and the clean stream of training (what the cache must hold) never sees
[MASK]; the commit rows recompute them on the decided tokens, at no extra forward.

AR decoding (objective `ar`): the same cache with block size 1; each forward commits the last
token and predicts the next from its row. Shifted prediction (a block's first token predicted by
the previous block's last clean row) uses the logits of that row, kept from its commit forward.

Batches: every sequence has its own cache length, position ids and state; sequences that are done
or have nothing to commit fill their rows with IDLE padding, and stop independently at
end-of-document or at the length limit.

Part of the decoding core: the model is a `Network` (`inference/network.py`), and an exported
model runs this file as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from cascade_mega.diffusion.masks import masked_share
from cascade_mega.errors import UserError
from cascade_mega.inference.kv_cache import CLEAN, IDLE, NOISY, DecodeStep, KVCache, to_device
from cascade_mega.inference.policies import Policy, decide
from cascade_mega.inference.sampling import Sampling, sample


class GenerationError(UserError, ValueError):
    pass


OTHER_DECODERS: dict = {}  # policy name -> decoder class (`speculative.py` adds its own)


@dataclass
class BlockStats:
    index: int  # block index in the sequence (position // B)
    steps: int  # denoising forwards it took
    tokens: int  # tokens it decided


@dataclass
class Generation:
    prompt: List[int]
    tokens: List[int] = field(default_factory=list)  # generated, end-of-document excluded
    blocks: List[BlockStats] = field(default_factory=list)
    stopped: str = ""  # "eod" | "length"
    text: str = ""
    # speculative decoding: per round, where the draft started in its block, tokens drafted,
    # accepted, and the draft's steps
    speculation: List[dict] = field(default_factory=list)


def check_request(prompts: List[List[int]], max_len: int, max_new_tokens: int) -> None:
    """Empty prompts, prompts that fill the context, a non-positive token budget: one message."""
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty")
        if len(p) >= max_len:
            raise GenerationError(f"prompt {i} has {len(p)} tokens; the model's context is "
                                  f"{max_len} (data.seq_len), leaving no room to generate")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


class _Sequence:
    def __init__(self, prompt: List[int], B: int, ar: bool):
        self.out = Generation(prompt=list(prompt))
        P = len(prompt)
        full = P if ar else P // B * B
        self.commit = list(prompt[:full])  # tokens to commit by the next forward
        self.commit_start = 0
        self.block = P // B  # current block (AR: next position)
        self.given = list(prompt[full:])  # prompt tail inside the current block
        self.x: Optional[torch.Tensor] = None
        self.confidence: Optional[torch.Tensor] = None
        self.end = 0  # positions [len(given), end) of the block are decided
        self.steps = 0
        self.cap = 0  # the policy's steps for this block
        self.done = False
        self.last_clean = None  # logits of the newest committed row


class Decoder:
    def __init__(self, net):
        if net.full:
            raise GenerationError("full-diffusion models (block size = context) decode with "
                                  "FullDiffusionDecoder (inference/full_diffusion.py)")
        self.net = net
        self.ar = net.causal
        self.B = 1 if self.ar else net.block_size
        self.shifted = self.ar or net.shifted
        self.max_len = net.max_len
        self.forwards = 0

    # ------------------------------------------------------------------ one forward
    def _forward(self, seqs: List[_Sequence]):
        B, mask_id = self.B, self.net.mask_id
        width = max(len(s.commit) for s in seqs)
        noisy = 0 if self.ar else B
        b, n = len(seqs), width + noisy
        ids = torch.full((b, n), mask_id, dtype=torch.long)
        pos = torch.zeros((b, n), dtype=torch.long)
        kinds = torch.full((b, n), IDLE, dtype=torch.long)
        # host, crossing with the rows below; time conditioning: committed rows 0
        levels = torch.zeros((b, n))
        for i, s in enumerate(seqs):
            c = len(s.commit)
            if c:
                p = torch.arange(s.commit_start, s.commit_start + c)
                ids[i, :c], pos[i, :c], kinds[i, :c] = torch.tensor(s.commit), p, CLEAN
            if noisy and not s.done:
                p = torch.arange(s.block * B, (s.block + 1) * B)
                ids[i, width:], pos[i, width:] = s.x, p
                kinds[i, width:] = NOISY
                levels[i, width:] = masked_share(s.x[None], mask_id, B)[0]  # noise_level.py
        last = [max(len(s.commit) - 1, 0) for s in seqs]
        # the output layer runs only on rows that predict a still-masked position
        needed = set()
        for s in seqs:
            if noisy and not s.done:
                masked = (s.x[:s.end] == mask_id).nonzero().squeeze(1) - int(self.shifted)
                needed |= {width + int(r) for r in masked if r >= 0}
        cols = sorted(set(last) | needed)
        step = DecodeStep(self.cache, kinds, pos, B, self.net.flex, self.net.clean_stream)
        # the rows are laid out on the host (per-sequence bookkeeping) and cross in one go
        levels = levels if self.net.time_conditioning else None
        ids, pos, cols_t, levels = to_device((ids, pos, torch.tensor(cols), levels),
                                             self.net.device)
        logits = self.net.logits(ids, pos, step, cols_t, levels)
        step.commit()
        self.forwards += 1
        where = {c: j for j, c in enumerate(cols)}
        for i, s in enumerate(seqs):
            if s.commit:
                s.last_clean = logits[i, where[last[i]]]
                s.commit_start += len(s.commit)
                s.commit = []
        if not noisy:
            return None
        # position r of the block reads logits row index[r] (-1: none; shifted r = 0: the clean
        # row, kept in last_clean)
        shift = int(self.shifted)
        index = torch.tensor([where.get(width + r - shift, -1) for r in range(B)])
        return logits, index  # index: host (the decoder's state lives there)

    # ------------------------------------------------------------------ decisions
    def _finish(self, s: _Sequence, new: List[int], stream, i):
        """Append decided tokens; stop at end-of-document or the limits."""
        eod = self.net.eod
        if eod in new:
            new, s.done, s.out.stopped = new[:new.index(eod)], True, "eod"
        room = self.max_new - len(s.out.tokens)
        if len(new) >= room:
            new, s.done = new[:room], True
            s.out.stopped = s.out.stopped or "length"
        s.out.tokens += new
        if stream and new:
            stream(i, new)

    def _ar_step(self, s: _Sequence, i, stream):
        token, _ = sample(s.last_clean[None], self.sampling, self.gen)
        t = int(token)
        s.out.blocks.append(BlockStats(index=s.block, steps=1, tokens=1))
        self._finish(s, [t], stream, i)
        s.block += 1
        if not s.done and s.block >= self.max_len:
            s.done, s.out.stopped = True, "length"
        if not s.done:
            s.commit = [t]

    def _block_step(self, s: _Sequence, logits, index, i, stream):
        mask_id = self.net.mask_id
        masked = (s.x[:s.end] == mask_id).nonzero().squeeze(1)
        rows = logits[index[masked].clamp(min=0).to(logits.device)]
        if self.shifted and int(masked[0]) == 0 and s.last_clean is not None:
            rows[0] = s.last_clean  # the block's first position: from the clean row before it
            # (a prompt shorter than a block has no clean row yet, but gives position 0)
        chosen, tokens, confidence = decide(self.policy, rows, self.sampling, self.gen,
                                            s.steps, s.cap, self.net.scores)
        # remasking: this block's earlier decisions (not the prompt's tail), least likely first
        mine = torch.arange(len(s.given), s.end)
        mine = mine[s.x[mine] != mask_id]
        back = mine[self.policy.to_remask(s.confidence[mine], len(chosen), s.steps, s.cap)]
        s.x[masked[chosen]], s.confidence[masked[chosen]] = tokens, confidence
        s.x[back] = mask_id
        s.steps += 1
        if bool((s.x[:s.end] == mask_id).any()):
            return
        decided = s.x[:s.end].tolist()
        s.out.blocks.append(BlockStats(index=s.block, steps=s.steps,
                                       tokens=s.end - len(s.given)))
        self._finish(s, decided[len(s.given):], stream, i)
        s.given = []
        if not s.done:
            s.commit = decided
            s.block += 1
            self._start_block(s)

    def _start_block(self, s: _Sequence):
        if s.done:
            return
        if (s.block + 1) * self.B > self.max_len:
            s.done, s.out.stopped = True, "length"
            return
        # host on purpose: a sequence's bookkeeping lives there; its rows cross per forward
        s.x = torch.full((self.B,), self.net.mask_id, dtype=torch.long)
        s.x[:len(s.given)] = torch.tensor(s.given, dtype=torch.long)
        s.confidence = torch.ones(self.B)  # each decided position's probability when decided
        s.end = min(self.B, len(s.given) + self.max_new - len(s.out.tokens))
        s.steps, s.cap = 0, self.policy.steps_for(s.end - len(s.given), self.B)

    # ------------------------------------------------------------------ public
    def _other(self, policy: Policy):
        """The decoder of a policy that is not block decoding (`speculative.py` registers
        itself in OTHER_DECODERS when it is imported, as `inference/load.py` and an exported
        model do), or None."""
        if policy.name not in ("speculative", "causal"):
            return None
        if policy.name not in OTHER_DECODERS:
            raise GenerationError(f"--policy {policy.name} needs cascade_mega.inference."
                                  "speculative imported")
        return OTHER_DECODERS[policy.name](self.net)

    def check_policy(self, policy: Policy) -> None:
        """GenerationError when this model cannot decode with `policy` (before any work)."""
        other = self._other(policy)
        if other is not None:
            other.check_policy(policy)

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], max_new_tokens: int = 128,
                 policy: Policy = Policy(), sampling: Sampling = Sampling(),
                 stream: Optional[Callable[[int, List[int]], None]] = None) -> List[Generation]:
        """Token-id prompts -> one Generation each. stream(i, tokens) gets each decided block.
        policy `speculative`: the diffusion stream drafts, the causal stream verifies; `causal`:
        the causal stream alone (`speculative.py`)."""
        decoder = self._other(policy)
        if decoder is not None:
            decoder.check_policy(policy)
            out = decoder.generate(prompts, max_new_tokens, policy, sampling, stream)
            self.forwards += decoder.forwards
            return out
        check_request(prompts, self.max_len, max_new_tokens)
        with self.net.decoding():
            return self._generate(prompts, max_new_tokens, policy, sampling, stream)

    def _generate(self, prompts, max_new_tokens, policy, sampling, stream):
        self.max_new, self.policy, self.sampling = max_new_tokens, policy, sampling
        self.gen = torch.Generator().manual_seed(sampling.seed)
        self.cache = KVCache(len(prompts), self.max_len)
        seqs = [_Sequence(p, self.B, self.ar) for p in prompts]
        if not self.ar:
            for s in seqs:
                self._start_block(s)
        while not all(s.done for s in seqs):
            if self.ar:
                self._forward(seqs)
            else:
                logits, index = self._forward(seqs)
            for i, s in enumerate(seqs):
                if s.done:
                    continue
                if self.ar:
                    self._ar_step(s, i, stream)
                else:
                    self._block_step(s, logits[i], index, i, stream)
        for s in seqs:
            s.out.text = self.net.detokenize(s.out.tokens)
        return [s.out for s in seqs]
