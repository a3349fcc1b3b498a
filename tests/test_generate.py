"""Block decoding with the KV cache against independent references, on the real megatron model.

Random weights make the greedy choices arbitrary but deterministic, which is what equality needs.
"""

import os
from types import SimpleNamespace

import pytest
import torch

from cascade_mega.diffusion.masks import AttentionLayout
from cascade_mega.inference.decode import Decoder
from cascade_mega.inference.policies import Policy
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


def _uncached(model, cfg, prompt, max_new, policy):
    """Greedy block decoding that recomputes everything each step through the training layout:
    [x_t ; x_0] over the blocks so far, the current block noisy in x_t, the prefix clean in x_0."""
    seq, given = list(prompt[:len(prompt) // B * B]), list(prompt[len(prompt) // B * B:])
    out = []
    while len(out) < max_new and len(seq) + B <= L:
        x = torch.tensor(given + [MASK_ID] * (B - len(given)))
        end = min(B, len(given) + max_new - len(out))  # the budget may end inside the block
        step, cap = 0, policy.steps_for(end - len(given), B)
        while (x[:end] == MASK_ID).any():
            n = len(seq) + B
            clean = torch.tensor(seq + [MASK_ID] * B)  # the current block's clean rows: unseen
            noisy = torch.cat([clean[:len(seq)], x])
            ids = torch.cat([noisy, clean])[None]
            pos = torch.arange(n).repeat(2)[None]
            hidden = model(ids, pos, AttentionLayout("block_diffusion", n, B),
                           output_processor=lambda hidden_states, output_layer, output_weight,
                           **_: output_layer(hidden_states, weight=output_weight)[0])
            logits = (hidden[len(seq):n, 0].float() + model.output_layer.logit_bias)
            masked = (x[:end] == MASK_ID).nonzero().squeeze(1)
            tokens, confidence = sample(logits[masked], Sampling(), None)
            chosen = policy.choose(confidence, step, cap)
            x[masked[chosen]] = tokens[chosen]
            step += 1
        out += x.tolist()[len(given):end]
        seq += x.tolist()
        given = []
    return out[:max_new]


@pytest.mark.parametrize("policy", [Policy("fixed", steps=2), Policy("threshold", tau=0.05),
                                    Policy("adaptive", steps=3, tau=0.05)])
def test_cached_decoding_equals_recomputing_the_prefix(megatron, policy):
    cfg = tiny_cfg(f"data.seq_len={L}", f"diffusion.block_size={B}", WIDE)
    model = tiny_model(cfg, seed=1)
    decoder = Decoder(model, cfg, _tokenizer())
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
    blockwise = Decoder(model, bd, _tokenizer()).generate(prompts, max_new_tokens=16)
    autoregressive = Decoder(model, ar, _tokenizer()).generate(prompts, max_new_tokens=16)
    assert [g.tokens for g in blockwise] == [g.tokens for g in autoregressive]
    assert all(len(g.tokens) == 16 for g in blockwise)


@pytest.mark.parametrize("objective", ["block_diffusion", "ar"])
def test_batched_generation_equals_one_by_one(megatron, objective):
    cfg = tiny_cfg(f"data.seq_len={L}", f"diffusion.block_size={B}",
                   f"diffusion.objective={objective}", "diffusion.shifted_prediction=true", WIDE)
    decoder = Decoder(tiny_model(cfg, seed=5), cfg, _tokenizer())
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
    free = Decoder(model, cfg, _tokenizer()).generate(prompts, max_new_tokens=24)
    first, second = free[0].tokens, free[1].tokens
    eod = next(t for t in first[3:] if t not in second)  # a token only the first sequence emits
    stopped = Decoder(model, cfg, _tokenizer(eod)).generate(prompts, max_new_tokens=24)
    assert stopped[0].stopped == "eod" and stopped[0].tokens == first[:first.index(eod)]
    assert stopped[1].stopped == "length" and stopped[1].tokens == second


def test_threshold_above_one_decides_one_token_per_step(megatron):
    cfg = tiny_cfg(f"data.seq_len={L}", f"diffusion.block_size={B}", WIDE)
    model = tiny_model(cfg, seed=9)
    [prompt] = _prompts(6, seed=10)
    decoder = Decoder(model, cfg, _tokenizer())
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
    decoder = Decoder(tiny_model(cfg, seed=11), cfg, _tokenizer())
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
