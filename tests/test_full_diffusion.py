"""Full-diffusion decoding (B = L): Fast-dLLM's approximate cache and classifier-free guidance.

References: the training layout (`AttentionLayout("full", T)`) over the whole canvas, run
separately for every step; random weights make greedy choices arbitrary but deterministic.
"""

from types import SimpleNamespace

import pytest
import torch

from cascade_mega.diffusion.masks import AttentionLayout
from cascade_mega.inference.decode import GenerationError
from cascade_mega.inference.load import decoder_for
from cascade_mega.inference.policies import Policy
from cascade_mega.inference.sampling import Sampling, sample
from helpers import MASK_ID, tiny_cfg, tiny_model

L = 32
WIDE = "model.init_std=0.3"


def _tok(eod=-1):
    return SimpleNamespace(mask_id=MASK_ID, eod=eod, decode=lambda ids: " ".join(map(str, ids)))


def _setup(shifted=False):
    cfg = tiny_cfg(f"data.seq_len={L}", f"diffusion.block_size={L}", WIDE,
                   f"diffusion.shifted_prediction={str(shifted).lower()}")
    return cfg, tiny_model(cfg, seed=11)


def _full_logits(model, canvas):
    """[b, T, V] logits of every row through the training layout of full diffusion."""
    T = canvas.shape[1]
    out = model(canvas, torch.arange(T).expand(canvas.shape[0], T), AttentionLayout("full", T),
                output_processor=lambda hidden_states, output_layer, output_weight, **_:
                output_layer(hidden_states, weight=output_weight)[0])
    return (out.float() + model.output_layer.logit_bias).transpose(0, 1)


def _reference(model, prompt, max_new, block, policy, shifted=False, guidance=0.0):
    """Exact decoding: every step reruns the whole canvas (and the unconditional one)."""
    P = len(prompt)
    canvas = torch.tensor(prompt + [MASK_ID] * max_new)[None]
    uncond = canvas.clone()
    uncond[0, :P] = MASK_ID
    forwards = 0
    for start in range(P, P + max_new, block):
        end, step = min(start + block, P + max_new), 0
        while (canvas[0, start:end] == MASK_ID).any():
            logits = _full_logits(model, canvas)[0]
            forwards += 1
            if guidance:
                u = _full_logits(model, uncond)[0]
                logits = torch.where(logits.isinf(), logits,
                                     (1 + guidance) * logits - guidance * u)
            rows = logits[start - 1:end - 1] if shifted else logits[start:end]
            masked = (canvas[0, start:end] == MASK_ID).nonzero().squeeze(1)
            tokens, conf = sample(rows[masked], Sampling(), None)
            chosen = policy.choose(conf, step)
            canvas[0, start + masked[chosen]] = tokens[chosen]
            uncond[0, start + masked[chosen]] = tokens[chosen]
            step += 1
    return canvas[0, P:].tolist(), forwards


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_uncached_decoding_and_guidance_equal_the_reference(megatron, shifted, guidance):
    cfg, model = _setup(shifted)
    policy = Policy("threshold", tau=0.3)
    prompt = torch.randint(0, MASK_ID, (5,), generator=torch.Generator().manual_seed(1)).tolist()
    dec = decoder_for(model, cfg, _tok(), cache="none", block=6, guidance=guidance)
    got = dec.generate([prompt], 20, policy)[0]
    want, forwards = _reference(model, prompt, 20, 6, policy, shifted, guidance)
    assert got.tokens == want and dec.forwards == forwards
    assert forwards < 20  # several tokens per forward: the threshold decided in parallel
    if guidance:  # guidance changes what is decided
        assert want != _reference(model, prompt, 20, 6, policy, shifted)[0]


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_forward_equals_the_full_forward_while_the_canvas_is_unchanged(megatron, mode,
                                                                              shifted):
    """The cache plumbing is exact: a cached forward right after the filling one, on the same
    canvas, gives the whole-canvas logits of the block (the approximation only comes from tokens
    decided since the cache was filled). Shifted: position p from row p - 1, the block's first
    from the filling forward's row."""
    cfg, model = _setup(shifted)
    canvas = torch.randint(0, MASK_ID, (1, 24), generator=torch.Generator().manual_seed(2))
    canvas[0, 14:] = MASK_ID
    dec = decoder_for(model, cfg, _tok(), cache=mode, block=4)
    dec.kv = {}
    first = dec._block_logits(canvas, 10, 14, True, None)
    rows = dec.rows
    again = dec._block_logits(canvas, 10, 14, False, first[:, :1])
    assert rows == 24 and dec.rows - rows == (4 if mode == "dual" else 14)
    ref = _full_logits(model, canvas)[:, 9:13] if shifted else \
        _full_logits(model, canvas)[:, 10:14]
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-5)
    canvas[0, 16] = 3  # a later token decided: the dual cache does not see it, prefix does
    changed = _full_logits(model, canvas)[:, 9:13] if shifted else \
        _full_logits(model, canvas)[:, 10:14]
    stale = dec._block_logits(canvas, 10, 14, False, first[:, :1])
    assert not torch.allclose(changed, ref, atol=1e-4)
    if mode == "dual":  # the block's rows attend the suffix as it was when the cache was filled
        torch.testing.assert_close(stale, ref, rtol=1e-5, atol=1e-5)
    else:  # the suffix is recomputed (the prefix's K/V are the approximation)
        assert not torch.allclose(stale, ref, atol=1e-4)


def test_cached_decoding_runs_fewer_rows_and_stops_at_end_of_document(megatron):
    cfg, model = _setup()
    prompt = [1, 2, 3, 4]
    exact = decoder_for(model, cfg, _tok(), cache="none", block=4)
    tokens = exact.generate([prompt], 24, Policy("threshold", tau=1.1))[0].tokens
    assert len(tokens) == 24
    dual = decoder_for(model, cfg, _tok(), cache="dual", block=4)
    out = dual.generate([prompt], 24, Policy("threshold", tau=1.1))[0]
    assert dual.forwards == 24 and len(out.blocks) == 6 and all(b.steps == 4 for b in out.blocks)
    # rows run: the whole canvas (28) once a block, then the block's 4 rows (none: 28 each time)
    assert exact.rows == 24 * 28 and dual.rows == 6 * 28 + 18 * 4
    eod = tokens[9]  # a token the exact decoder puts at position 9: make it end-of-document
    stop = decoder_for(model, cfg, _tok(eod), cache="none", block=4)
    got = stop.generate([prompt], 24, Policy("threshold", tau=1.1))[0]
    assert got.stopped == "eod" and got.tokens == tokens[:tokens.index(eod)]


def test_bad_options_give_one_message(megatron):
    cfg, model = _setup()
    for kwargs, needle in [({"cache": "full"}, "cache must be"), ({"block": 0}, "block"),
                           ({"guidance": -1.0}, "guidance")]:
        with pytest.raises(GenerationError, match=needle):
            decoder_for(model, cfg, _tok(), **kwargs)
    dec = decoder_for(model, cfg, _tok())
    with pytest.raises(GenerationError, match="context"):
        dec.generate([list(range(1, L + 1))])


def test_cascade_generate_decodes_a_full_diffusion_run(tmp_path):
    """`cascade generate` on a B = L checkpoint: dual cache, guidance, one JSON line per prompt;
    `--guidance` on a block-diffusion checkpoint is one clear error."""
    import json

    from helpers import cascade
    from test_bad_input import one_error

    runs = {}
    for name, block in (("mdlm", 32), ("bd", 8)):
        runs[name] = tmp_path / name
        proc = cascade("train", "configs/base.yaml", "model.num_layers=1",
                       "model.hidden_size=64", "data.seq_len=32", f"diffusion.block_size={block}",
                       "train.steps=1", "train.micro_batch_size=2", "train.global_batch_size=2",
                       "train.eval_batches=0", "optimizer.warmup_steps=0",
                       "tracking.enabled=false", f"run_dir={runs[name]}")
        assert proc.returncode == 0, proc.stderr
    proc = cascade("generate", "--ckpt", str(runs["mdlm"]), "--prompt", "ROMEO:", "--json",
                   "--policy", "threshold", "--tau", "0.5", "--cache", "dual", "--decode-block",
                   "8", "--guidance", "1.0", "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < len(out["tokens"]) <= 16 and out["blocks"][0]["tokens"] == 8
    one_error(cascade("generate", "--ckpt", str(runs["bd"]), "--prompt", "ROMEO:",
                      "--guidance", "1.0", "--cache", "prefix"),
              "--cache, --guidance applies to full-diffusion")


def test_samples_logged_during_training_use_the_decoder_of_the_objective(megatron, tmp_path):
    """The tracking callback's samples go through `cascade generate`'s decoder factory: a
    full-diffusion run (B = L) logs samples too (the block decoder refuses it)."""
    from types import SimpleNamespace

    from cascade_mega.config import load_config
    from cascade_mega.inference.full_diffusion import FullDiffusionDecoder
    from cascade_mega.inference.load import decoder_for
    from cascade_mega.train.callbacks import SampleGenerations
    from cascade_mega.train.trainer import Trainer

    cfg = load_config(None, [f"run_dir={tmp_path}", "model.num_layers=1", "model.hidden_size=64",
                             "data.seq_len=32", "diffusion.block_size=32", "train.steps=1",
                             "train.micro_batch_size=2", "train.global_batch_size=2",
                             "optimizer.warmup_steps=0", "tracking.samples=2",
                             "tracking.sample_tokens=8"], world_size=1)
    trainer = Trainer(cfg, []).setup()
    assert isinstance(decoder_for(trainer.chunks[0], cfg, trainer.tokenizer),
                      FullDiffusionDecoder)
    sent = []
    samples = SampleGenerations(cfg, SimpleNamespace(artifact=lambda *a: sent.append(a)))
    samples.on_eval_end(trainer, 7, {})
    assert samples.ok
    (name, text), = sent
    assert name == "samples/step_0000007.txt" and text.decode().count("### prompt:") == 2
