"""Block decoding with the KV cache against independent references, on the real megatron model.

Random weights make the greedy choices arbitrary but deterministic, which is what equality needs.
"""

import os
from types import SimpleNamespace

import pytest
import torch

from cascade_mega.diffusion.masks import AttentionLayout
from cascade_mega.inference.load import decoder_for
from cascade_mega.inference.policies import Policy, decide
from cascade_mega.inference.sampling import Sampling, sample
from helpers import MASK_ID, VOCAB, tiny_cfg, tiny_model

L, B = 48, 4
# a wide initialisation gives peaked, varied predictions: greedy choices that differ per position
WIDE = "model.init_std=0.3"


def _tokenizer(eod=-1):
    return SimpleNamespace(mask_id=MASK_ID, eod=eod, decode=lambda ids: " ".join(map(str, ids)))


def _prompts(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MASK_ID, (n,), generator=g).tolist() for n in lengths]


def _block_logits(model, seq, x, rule="block_causal"):
    """Logits [B, V] of the block after the clean prefix `seq`, the block's state x (tokens or
    [MASK]), through the training layout [x_t ; x_0]: the current block noisy in x_t, the prefix
    clean in x_0 (the current block's clean rows are unseen). A time-conditioned model reads
    the block's masked share as its noise level, every clean row 0."""
    n = len(seq) + len(x)
    clean = torch.tensor(seq + [MASK_ID] * len(x))
    noisy = torch.cat([clean[:len(seq)], x])
    ids = torch.cat([noisy, clean])[None]
    pos = torch.arange(n).repeat(2)[None]
    levels = None
    if getattr(model, "noise_embedding", None) is not None:
        levels = torch.zeros(1, 2 * n)
        levels[0, len(seq):n] = (x == MASK_ID).float().mean()
    hidden = model(ids, pos, AttentionLayout("block_diffusion", n, len(x), clean_stream=rule),
                   output_processor=lambda hidden_states, output_layer, output_weight,
                   **_: output_layer(hidden_states, weight=output_weight)[0],
                   noise_levels=levels)
    return hidden[len(seq):n, 0].float() + model.output_layer.logit_bias


def _uncached(model, cfg, prompt, max_new, policy):
    """Greedy block decoding that recomputes everything each step through the training layout."""
    seq, given = list(prompt[:len(prompt) // B * B]), list(prompt[len(prompt) // B * B:])
    out, gen = [], torch.Generator().manual_seed(Sampling().seed)  # the decoder's draws
    while len(out) < max_new and len(seq) + B <= L:
        x = torch.tensor(given + [MASK_ID] * (B - len(given)))
        end = min(B, len(given) + max_new - len(out))  # the budget may end inside the block
        step, cap = 0, policy.steps_for(end - len(given), B)
        while (x[:end] == MASK_ID).any():
            logits = _block_logits(model, seq, x, cfg.diffusion.clean_stream)
            masked = (x[:end] == MASK_ID).nonzero().squeeze(1)
            if policy.name == "tweedie":  # which positions: the step's own draws
                chosen, tokens, _ = decide(policy, logits[masked], Sampling(), gen, step, cap,
                                           scores=True)
            else:
                tokens, confidence = sample(logits[masked], Sampling(), None)
                chosen = policy.choose(confidence, step, cap)
                tokens = tokens[chosen]
            x[masked[chosen]] = tokens
            step += 1
        out += x.tolist()[len(given):end]
        seq += x.tolist()
        given = []
    return out[:max_new]


SCORED = ("diffusion.loss=score_entropy", "model.time_conditioning=true")


@pytest.mark.parametrize("policy,extra", [
    (Policy("fixed", steps=2), ()), (Policy("threshold", tau=0.05), ()),
    (Policy("adaptive", steps=3, tau=0.05), ()),
    (Policy("fixed", steps=2), ("diffusion.clean_stream=causal",)),  # committed rows: causal
    # a time-conditioned score-entropy model under the `tweedie` step (the scores' exact step)
    (Policy("tweedie", steps=3), SCORED)])
def test_cached_decoding_equals_recomputing_the_prefix(megatron, policy, extra):
    cfg = tiny_cfg(f"data.seq_len={L}", f"diffusion.block_size={B}", WIDE, *extra)
    model = tiny_model(cfg, seed=1)
    if extra == SCORED:  # a trained embedder is not zero: wrong noise levels change the tokens
        with torch.no_grad():
            for p in model.noise_embedding.parameters():
                p.normal_(0, 0.3)
    decoder = decoder_for(model, cfg, _tokenizer())
    for prompt in _prompts(5, 8, seed=2):
        [got] = decoder.generate([prompt], max_new_tokens=20, policy=policy)
        assert got.tokens == _uncached(model, cfg, prompt, 20, policy)
        assert sum(b.tokens for b in got.blocks) >= 20


def test_block_size_one_equals_ar_decoding_of_the_same_weights(megatron):
    bd = tiny_cfg(f"data.seq_len={L}", "diffusion.block_size=1",
                  "diffusion.shifted_prediction=true", WIDE)
    ar = tiny_cfg(f"data.seq_len={L}", "diffusion.objective=ar", WIDE)
    model = tiny_model(bd, seed=3)
    prompts = _prompts(3, 6, seed=4)
    blockwise = decoder_for(model, bd, _tokenizer()).generate(prompts, max_new_tokens=16)
    autoregressive = decoder_for(model, ar, _tokenizer()).generate(prompts, max_new_tokens=16)
    assert [g.tokens for g in blockwise] == [g.tokens for g in autoregressive]
    assert all(len(g.tokens) == 16 for g in blockwise)


@pytest.mark.parametrize("objective", ["block_diffusion", "ar"])
def test_batched_generation_equals_one_by_one(megatron, objective):
    cfg = tiny_cfg(f"data.seq_len={L}", f"diffusion.block_size={B}",
                   f"diffusion.objective={objective}", "diffusion.shifted_prediction=true", WIDE)
    decoder = decoder_for(tiny_model(cfg, seed=5), cfg, _tokenizer())
    prompts = _prompts(3, 9, 12, 4, seed=6)  # different lengths, inside and on block edges
    policy = Policy("adaptive", steps=3, tau=0.3)
    batched = decoder.generate(prompts, max_new_tokens=18, policy=policy)
    for prompt, together in zip(prompts, batched):
        [alone] = decoder.generate([prompt], max_new_tokens=18, policy=policy)
        assert together.tokens == alone.tokens and together.blocks == alone.blocks


def test_each_sequence_stops_at_its_own_end_of_document(megatron):
    cfg = tiny_cfg(f"data.seq_len={L}", f"diffusion.block_size={B}", WIDE)
    model = tiny_model(cfg, seed=7)
    prompts = _prompts(5, 7, seed=8)
    free = decoder_for(model, cfg, _tokenizer()).generate(prompts, max_new_tokens=24)
    first, second = free[0].tokens, free[1].tokens
    eod = next(t for t in first[3:] if t not in second)  # a token only the first sequence emits
    stopped = decoder_for(model, cfg, _tokenizer(eod)).generate(prompts, max_new_tokens=24)
    assert stopped[0].stopped == "eod" and stopped[0].tokens == first[:first.index(eod)]
    assert stopped[1].stopped == "length" and stopped[1].tokens == second


def test_threshold_above_one_decides_one_token_per_step(megatron):
    cfg = tiny_cfg(f"data.seq_len={L}", f"diffusion.block_size={B}", WIDE)
    model = tiny_model(cfg, seed=9)
    [prompt] = _prompts(6, seed=10)
    decoder = decoder_for(model, cfg, _tokenizer())
    [one] = decoder.generate([prompt], max_new_tokens=12, policy=Policy("threshold", tau=1.5))
    assert all(b.steps == b.tokens for b in one.blocks)
    assert decoder.forwards == sum(b.steps for b in one.blocks)  # the commits ride along
    [fixed] = decoder.generate([prompt], max_new_tokens=12, policy=Policy("fixed", steps=B))
    assert fixed.tokens == one.tokens


def test_adaptive_cap_follows_the_positions_a_block_decides(megatron):
    """Prompt tail and token budget inside blocks: 1 and 2 of B = 4 positions to decide get
    ceil(3 k / 4) = 1 and 2 steps, a whole block the cap of 3; the rest of the last block stays
    undecided."""
    cfg = tiny_cfg(f"data.seq_len={L}", f"diffusion.block_size={B}", WIDE)
    decoder = decoder_for(tiny_model(cfg, seed=11), cfg, _tokenizer())
    [prompt] = _prompts(7, seed=12)
    [out] = decoder.generate([prompt], max_new_tokens=7, policy=Policy("adaptive", 3, tau=2.0))
    assert [(b.steps, b.tokens) for b in out.blocks] == [(1, 1), (3, 4), (2, 2)]
    assert decoder.forwards == 6 and len(out.tokens) == 7 and out.stopped == "length"


@pytest.mark.parametrize("name, counts", [("fixed", [6, 5, 5]), ("adaptive", [3, 6, 7])])
def test_steps_per_block_follow_the_policy_schedule(name, counts):
    """With nothing confident, a block of 16 at S = 3: fixed splits evenly, adaptive follows the
    cosine floor; positions at or above tau are decided together; at most S steps either way."""
    policy, gen = Policy(name, steps=3, tau=0.9), torch.Generator().manual_seed(0)
    left, got = 16, []
    while left:
        got.append(len(policy.choose(torch.rand(left, generator=gen) * 0.8, len(got))))
        left -= got[-1]
    assert got == counts
    confident = torch.cat([torch.full((10,), 0.95), torch.rand(6, generator=gen) * 0.8])
    expected = 10 if name == "adaptive" else 6
    assert len(policy.choose(confident, 0)) == expected


def test_a_run_directory_stands_alone(megatron, tmp_path, monkeypatch):
    """Generation and export read the run's own tokenizer copy: from another directory, with the
    built-in corpus's cache deleted, nothing is rebuilt anywhere."""
    import json
    import shutil

    from cascade_mega.config import load_config
    from cascade_mega.train.trainer import Trainer
    from helpers import cascade

    cache = tmp_path / "cache"
    monkeypatch.setenv("CASCADE_DATA_HOME", str(cache))
    run = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run}", "model.num_layers=1", "model.hidden_size=64",
                             "data.seq_len=32", "diffusion.block_size=8", "train.steps=1",
                             "train.micro_batch_size=2", "train.global_batch_size=2",
                             "train.eval_batches=0", "optimizer.warmup_steps=0",
                             "tracking.enabled=false"], world_size=1)
    Trainer(cfg, []).setup().fit()
    assert (run / "tokenizer.json").is_file()
    assert (run / "data" / "shakespeare_text_document.meta.json").is_file()
    shutil.rmtree(cache)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    gen = cascade("generate", "--ckpt", run, "--prompt", "ROMEO:", "--max-new-tokens", "8",
                  "--json", cwd=elsewhere)
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout.splitlines()[-1])["tokens"]
    out = cascade("convert", "mcore-to-hf", run, tmp_path / "hf", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert not cache.exists() and os.listdir(elsewhere) == []


def test_random_order_one_position_per_step_is_ancestral_sampling(megatron):
    """Random order, one position per step (fixed, steps = B): a block's tokens follow ancestral
    sampling from the training layout's conditionals (the next position uniform among the masked
    ones, its token from its conditional given the positions decided so far). The exact law by
    enumerating the block's partial states (top-3 support, B = 2) against 4,000 decoded blocks
    (total variation 0.008 at 16,000; the former drawn-probability order: 0.23)."""
    from collections import Counter

    from cascade_mega.inference.sampling import distribution

    b, draws = 2, 4000
    cfg = tiny_cfg("data.seq_len=16", f"diffusion.block_size={b}", WIDE)
    model = tiny_model(cfg, seed=13)
    [prompt] = _prompts(4, seed=14)
    sampling = Sampling(greedy=False, top_k=3, temperature=2.0)
    exact = Counter()

    def walk(x, p):
        masked = (x == MASK_ID).nonzero().squeeze(1).tolist()
        if not masked:
            exact[tuple(x.tolist())] += p
            return
        with torch.no_grad():
            probs = distribution(_block_logits(model, prompt, x), sampling).double()
        for r in masked:
            for t in probs[r].nonzero().squeeze(1).tolist():
                y = x.clone()
                y[r] = t
                walk(y, p * float(probs[r, t]) / len(masked))

    walk(torch.full((b,), MASK_ID), 1.0)
    assert abs(sum(exact.values()) - 1) < 1e-6  # float32 conditionals
    decoder = decoder_for(model, cfg, _tokenizer())
    outs = decoder.generate([prompt] * draws, b, Policy("fixed", b, order="random"), sampling)
    counts = Counter(tuple(o.tokens) for o in outs)
    assert set(counts) <= set(exact)
    tv = 0.5 * sum(abs(counts[k] / draws - p) for k, p in exact.items())
    # the test's power: both positions drawn from the all-masked conditionals is another law
    with torch.no_grad():
        first = distribution(_block_logits(model, prompt, torch.full((b,), MASK_ID)),
                             sampling).double()
    apart = 0.5 * sum(abs(float(first[0, k[0]] * first[1, k[1]]) - p) for k, p in exact.items())
    assert tv < 0.06 < 0.2 < apart, (tv, apart)  # noise ~0.02 at 4,000 draws


class _ChosenLogits(torch.nn.Module):
    """A stand-in model: at block position r the logits are uniform over the first k[r] ids
    (entropy log k[r], largest probability 1 / k[r]), whatever the context; it records the
    noisy rows of each forward (the block as each step sees it)."""

    def __init__(self, ks):
        super().__init__()
        self.ks, self.seen = ks, []
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, pos, step, output_processor, output_processor_context,
                noise_levels=None):
        cols = output_processor_context.tolist()
        logits = torch.full((ids.shape[0], len(cols), VOCAB), float("-inf"))
        for i in range(ids.shape[0]):
            for j, c in enumerate(cols):
                logits[i, j, :self.ks[int(pos[i, c]) % len(self.ks)]] = 0.0
        self.seen.append((ids[0, -len(self.ks):] != MASK_ID).int().tolist())
        return logits


@pytest.mark.parametrize("steps, bound, per_step", [
    (4, 1.0, [[1, 1, 1, 0]]),  # 0 + .69 (log 4 the largest) <= 1.0, 0 + .69 + 1.39 not
    (4, 2.1, []),  # 0 + .69 + 1.39 <= 2.1: the whole block in one step
    (2, 0.5, [[1, 1, 0, 0]]),  # 0 <= 0.5, .69 not; the cap: the second step decides the rest
    (4, 0.5, [[1, 1, 0, 0], [1, 1, 1, 0]]),  # then log 4, log 8: 1.39 > 0.5, one at a time
])
def test_entropy_bound_decides_the_positions_it_allows(steps, bound, per_step):
    """Block positions of entropy 0, log 2, log 4, log 8 nats: each step decides, most confident
    first, EB-sampler's longest run whose summed entropy less its largest is within the bound (so
    at least one position), and everything at the cap's last step."""
    cfg = tiny_cfg("data.seq_len=16", "diffusion.block_size=4")
    model = _ChosenLogits([1, 2, 4, 8])
    decoder = decoder_for(model, cfg, _tokenizer())
    [out] = decoder.generate([[5, 6, 7, 8]], 8, Policy("entropy", steps, bound=bound))
    block = [[0, 0, 0, 0]] + per_step
    assert model.seen == block + block
    assert [b.steps for b in out.blocks] == [len(block)] * 2 and len(out.tokens) == 8


@pytest.mark.parametrize("policy", [Policy("fixed", 3, remask=0.3),
                                    Policy("adaptive", 3, remask=0.3),
                                    Policy("entropy", 3, bound=2.1, remask=0.3)])
def test_remasking_ends_every_block_decided_within_its_budget(policy):
    """Every decision has probability 1/8 < 0.3, so each step before the last remasks earlier
    ones (fewer than it decides); the last step remasks nothing and decides the rest."""
    cfg = tiny_cfg("data.seq_len=32", "diffusion.block_size=8")
    model = _ChosenLogits([8] * 8)
    [out] = decoder_for(model, cfg, _tokenizer()).generate([[5] * 8], 16, policy)
    assert [b.steps for b in out.blocks] == [3, 3] and len(out.tokens) == 16
    assert MASK_ID not in out.tokens
    went_back = any(before[r] and not after[r] for before, after in zip(model.seen, model.seen[1:])
                    for r in range(8) if sum(after) > 0)
    assert went_back
