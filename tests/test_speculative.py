"""Self-speculative decoding (`inference/speculative.py`) against the causal clean stream decoded
on its own, token by token, without a cache (a causal forward over the whole prefix per token):
greedy output equal token for token, sampled output equal in law (exact enumeration)."""

from collections import Counter

import pytest
import torch

from cascade_mega.diffusion.masks import AttentionLayout
from cascade_mega.inference.load import decoder_for
from cascade_mega.inference.policies import Policy
from cascade_mega.inference.sampling import Sampling, distribution
from cascade_mega.model.gpt import allowed_logits
from helpers import MASK_ID, tiny_cfg, tiny_model
from test_generate import WIDE, _prompts, _tokenizer

CAUSAL = ("diffusion.clean_stream=causal", "diffusion.ar_loss_weight=0.5")


def _causal_logits(model, seq):
    """The causal stream's logits for the position after `seq`: the clean stream alone under
    its causal mask (a plain causal forward), recomputed from scratch."""
    n = len(seq)

    def last(*, hidden_states, output_layer, output_weight, **_):
        return allowed_logits(hidden_states[-1:], output_layer, output_weight, None, True)

    levels = torch.zeros(1, n) if getattr(model, "noise_embedding", None) is not None else None
    with torch.no_grad():  # (a time-conditioned model: clean rows are at noise level 0)
        out = model(torch.tensor(seq)[None], torch.arange(n)[None],
                    AttentionLayout("causal", n), output_processor=last, noise_levels=levels)
    return out[0, 0].float()


def _causal_greedy(model, prompt, max_new, eod=-1):
    seq, out = list(prompt), []
    while len(out) < max_new:
        t = int(_causal_logits(model, seq).argmax())
        if t == eod:
            break
        out.append(t)
        seq.append(t)
    return out


@pytest.mark.parametrize("extra,draft", [
    ((), Policy("speculative", steps=2)),
    (("diffusion.shifted_prediction=true",), Policy("speculative", steps=3, draft="adaptive")),
    (("diffusion.shifted_prediction=true",), Policy("speculative", steps=2, redraft=True)),
    ((), Policy("speculative", steps=1, verify=3)),
    (("model.time_conditioning=true",), Policy("speculative", steps=1, tau=0.2,
                                               draft="threshold"))])
def test_greedy_speculative_output_is_the_causal_streams_greedy_output(megatron, extra, draft):
    """Prompts of different lengths in one batch (one ends inside a block), one of them stopped
    by an end-of-document the causal stream produces: every sequence equals its own causal greedy
    decoding; the cache holds exactly the accepted tokens after each cut."""
    L, B = 40, 4
    cfg = tiny_cfg(f"data.seq_len={L}", f"diffusion.block_size={B}", WIDE, *CAUSAL, *extra)
    model = tiny_model(cfg, seed=5)
    prompts = _prompts(3, 8, 6, seed=7)
    free = [_causal_greedy(model, p, 20) for p in prompts]
    eod = free[1][5]  # the second prompt stops at its sixth token
    expected = [_causal_greedy(model, p, 20, eod) for p in prompts]
    decoder = decoder_for(model, cfg, _tokenizer(eod))
    got = decoder.generate(prompts, 20, draft)
    assert [g.tokens for g in got] == expected
    # the causal stream alone, one token per forward with the cache
    assert [g.tokens for g in decoder.generate(prompts, 20, Policy("causal"))] == expected
    assert got[1].stopped == "eod" and len(got[1].tokens) < 20
    rounds = [r for g in got for r in g.speculation]
    assert rounds and all(0 <= r["accepted"] <= r["drafted"] for r in rounds)


@pytest.mark.parametrize("draft", [Policy("speculative", steps=1, verify=1),
                                   Policy("speculative", steps=2, order="random")])
def test_speculative_sampling_follows_the_causal_streams_law(megatron, draft):
    """Three tokens sampled (temperature 2, top-3) after a prompt, blocks of 2: the law of
    speculative sampling's output against the causal stream's exact law, enumerated (27
    sequences), over 6,000 draws. One draft step decides a block at once (every drafted token
    checked with its own q); two steps in random order also decide a token before one left of
    it (checked as a fixed draft). The test's power: the draft's own law (block decoding with
    the same policy) is far from the causal stream's."""
    draws, new = 6000, 3
    cfg = tiny_cfg("data.seq_len=16", "diffusion.block_size=2", WIDE, *CAUSAL)
    model = tiny_model(cfg, seed=13)
    with torch.no_grad():  # both streams favour ids 0-4: their top-3 overlap, in other orders
        model.output_layer.logit_bias[:5] += torch.tensor([6.0, 5.5, 5.0, 4.5, 4.0])
    [prompt] = _prompts(4, seed=14)
    sampling = Sampling(greedy=False, top_k=3, temperature=2.0, seed=3)
    exact = Counter()

    def walk(seq, p):
        if len(seq) == len(prompt) + new:
            exact[tuple(seq[len(prompt):])] += p
            return
        probs = distribution(_causal_logits(model, seq)[None], sampling)[0].double()
        for t in probs.nonzero().squeeze(1).tolist():
            walk(seq + [t], p * float(probs[t]))

    walk(list(prompt), 1.0)
    assert abs(sum(exact.values()) - 1) < 1e-6 and len(exact) > 20

    def tv(outs):
        counts = Counter(tuple(o.tokens) for o in outs)
        return 0.5 * sum(abs(counts[k] / draws - exact[k]) for k in set(counts) | set(exact))

    decoder = decoder_for(model, cfg, _tokenizer())
    got = tv(decoder.generate([prompt] * draws, new, draft, sampling))
    own = tv(decoder.generate([prompt] * draws, new, draft.draft_policy(), sampling))
    assert got < 0.06 < 0.2 < own, (got, own)  # noise ~0.03 at 6,000 draws
