"""`cascade convert mcore-to-hf` as a user elsewhere meets it: the exported directory in a fresh
interpreter where cascade_mega cannot be imported (`hf_remote.py`), against the run it came from.

Runs (made by `hf-to-mcore` from small random Hugging Face models, fp32): a block-diffusion Qwen2
(B = 4, tied embeddings, QKV biases), a block-diffusion Qwen3-MoE with shifted prediction (query /
key norms, a head dimension other than hidden / heads, experts with a dense first layer), a
full-diffusion Llama (B = L), a block-diffusion Llama with a causal clean stream (whose
`speculative` and `causal` policies run too) and an AR Llama; the Qwen3-MoE run is a score-entropy one (its
logits are scores, which the `tweedie` policy reads). Each export's logits on a fixed
`[x_t ; x_0]` layout (x_t alone for full diffusion, causal for AR) equal the megatron model's,
and its `generate` of 3 prompts of different lengths in one batch gives `cascade generate`'s
tokens for every policy, every order, remasking, and sampled as well as greedy (the exported
model runs the library's decoding core, copied; the AR export runs transformers' own Llama and
`generate`)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from cascade_mega.inference.load import decoder_for
from cascade_mega.inference.policies import Policy
from cascade_mega.inference.sampling import Sampling
from helpers import ROOT, cascade
from test_convert import hf_model

PROMPTS = ["ROMEO: But soft", "JULIET: O Romeo, Romeo, wherefore art thou", "To"]
# `generate` keyword arguments: every policy and order, remasking, greedy and sampled; the first
# also through `cascade generate` itself, the others through its decoder factory in this process
RUNS = [{"policy": "fixed", "steps": 2},
        {"policy": "adaptive", "steps": 3, "order": "margin", "remask": 0.3},
        {"policy": "threshold", "tau": 0.5, "order": "entropy", "do_sample": True, "seed": 1},
        {"policy": "entropy", "steps": 3, "bound": 1.0, "order": "drawn", "do_sample": True,
         "temperature": 0.8, "top_k": 20, "seed": 2},
        {"policy": "fixed", "steps": 4, "order": "random", "do_sample": True, "top_p": 0.9,
         "seed": 3},
        {"policy": "tweedie", "steps": 3, "do_sample": True, "seed": 4}]
# a causal clean stream's own policies: speculative (greedy, and sampled with another draft) and
# the causal stream alone
CAUSAL_RUNS = [{"policy": "speculative", "steps": 2},
               {"policy": "speculative", "draft": "adaptive", "steps": 3, "order": "margin",
                "do_sample": True, "top_k": 20, "seed": 5},
               {"policy": "causal", "do_sample": True, "temperature": 0.8, "seed": 6}]
FULL = {"cache": "prefix", "decode_block": 16, "guidance": 0.5}  # the full-diffusion export's
NEW = 20  # new tokens per prompt
CASES = {"block": ("qwen2", ["--objective", "block_diffusion", "--block-size", "4"]),
         "shifted_moe": ("qwen3_moe", ["--objective", "block_diffusion", "--block-size", "4"]),
         "full": ("llama", ["--objective", "block_diffusion", "--block-size", "64"]),
         "causal": ("llama", ["--objective", "block_diffusion", "--block-size", "4",
                              "--clean-stream", "causal"]),
         "ar": ("llama", [])}


def _reference_logits(run, x_t, x_0):
    from cascade_mega.diffusion.masks import AttentionLayout
    from cascade_mega.inference.load import load_decoder
    from cascade_mega.model.gpt import allowed_logits

    decoder = load_decoder(str(run), precision="fp32")
    net, L = decoder.net, x_t.shape[1]
    cfg = net.cfg
    if cfg.diffusion.objective == "ar":
        ids, pos, layout = x_t, torch.arange(L)[None], AttentionLayout("causal", L)
    elif cfg.diffusion.block_size == cfg.data.seq_len:
        ids, pos, layout = x_t, torch.arange(L)[None], AttentionLayout("full", L, L)
    else:
        ids, pos = torch.cat([x_t, x_0], 1), torch.arange(L).repeat(2)[None]
        layout = AttentionLayout("block_diffusion", L, cfg.diffusion.block_size,
                                 clean_stream=cfg.diffusion.clean_stream)

    def logits(*, hidden_states, output_layer, output_weight, **_):
        return allowed_logits(hidden_states, output_layer, output_weight, None, True)

    with torch.no_grad():
        out = net.model(ids, pos, layout, output_processor=logits)
    return out.transpose(0, 1)[:, :L].double(), net.tok, decoder


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    triples, found = [], {}
    for name, (kind, options) in CASES.items():
        hf, run, out = root / f"{name}_hf", root / f"{name}_run", root / f"{name}_out"
        hf_model(kind, hf)
        proc = cascade("convert", "hf-to-mcore", hf, run, "--seq-len", "64", *options)
        assert proc.returncode == 0, proc.stderr
        if name == "shifted_moe":  # as a score-entropy run with shifted prediction records it
            text = (run / "config.yaml").read_text()
            (run / "config.yaml").write_text(text.replace(
                "shifted_prediction: false", "shifted_prediction: true").replace(
                "loss: ce", "loss: score_entropy"))
        proc = cascade("convert", "mcore-to-hf", run, out)
        assert proc.returncode == 0, proc.stderr
        g = torch.Generator().manual_seed(len(name))
        x_0 = torch.randint(0, 300, (2, 64), generator=g)
        x_t = torch.where(torch.rand(2, 64, generator=g) < 0.5, 300, x_0)  # 300: [MASK]
        logits, tok, decoder = _reference_logits(run, x_0 if name == "ar" else x_t, x_0)
        assert tok.mask_id == 300
        full = FULL if name == "full" else {}
        options = [f"--{k.replace('_', '-')}={v}" for k, v in full.items()]
        proc = cascade("generate", "--ckpt", run, "--prompts-file", prompts_file,
                       "--max-new-tokens", NEW, "--policy", RUNS[0]["policy"],
                       "--steps", RUNS[0]["steps"], "--precision", "fp32", "--json", *options)
        assert proc.returncode == 0, proc.stderr
        ours = [[json.loads(line)["tokens"] for line in proc.stdout.splitlines()]]
        if full:
            decoder = decoder_for(decoder.net.model, decoder.net.cfg, decoder.net.tok,
                                  cache=full["cache"], block=full["decode_block"],
                                  guidance=full["guidance"])
        prompts = [tok.encode(p) for p in PROMPTS]
        runs = RUNS + (CAUSAL_RUNS if name == "causal" else [])
        for r in runs[1:] if name != "ar" else []:
            policy = Policy(r["policy"], r.get("steps", 4), r.get("tau", 0.9),
                            r.get("order", "confidence"), r.get("bound", 1.0), r.get("remask", 0),
                            r.get("draft", "fixed"))
            sampling = Sampling(greedy=not r.get("do_sample"), temperature=r.get(
                "temperature", 1.0), top_k=r.get("top_k", 0), top_p=r.get("top_p", 1.0),
                seed=r.get("seed", 0))
            ours.append([g.tokens for g in decoder.generate(prompts, NEW, policy, sampling)])
        request = root / f"{name}.request"
        torch.save({"x_t": x_0 if name == "ar" else x_t, "x_0": None if name == "full" else x_0,
                    "prompts": prompts,
                    "runs": [{**r, **full, "max_new_tokens": NEW}
                             for r in (RUNS[:1] if name == "ar" else runs)]}, request)
        triples += [out, request, root / f"{name}.result"]
        found[name] = {"logits": logits, "ours": ours, "out": out, "tok": tok}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "hf_remote.py"),
                           *map(str, triples)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in CASES:
        found[name]["hf"] = torch.load(root / f"{name}.result")
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_the_export_in_transformers_alone_equals_the_run(exports, name):
    case = exports[name]
    ref, got = case["logits"], case["hf"]["logits"].double()
    finite = torch.isfinite(ref)  # [MASK] and the padding rows are never predicted: -inf in
    assert not finite[..., 300].any() and finite[..., :300].all()  # the remote code's logits,
    if name == "ar":  # the plain architecture's generate suppresses them by its config
        banned = json.loads((case["out"] / "generation_config.json").read_text())
        assert sorted(banned["suppress_tokens"]) == (~finite[0, 0]).nonzero().squeeze(1).tolist()
    else:
        assert torch.equal(finite, torch.isfinite(got))
    assert (got[finite] - ref[finite]).abs().max() <= 1e-4
    assert all(len(t) > 0 for t in case["ours"][0])
    assert len(case["ours"]) == (1 if name == "ar" else
                                 len(RUNS) + len(CAUSAL_RUNS) * (name == "causal"))
    assert case["hf"]["tokens"] == case["ours"]
    if name == "causal":  # transformers' own greedy generate: the causal stream's greedy output
        assert case["hf"]["plain"] == case["ours"][len(RUNS)]  # = speculative greedy


def test_the_export_is_self_contained_and_says_one_end_of_text(exports):
    for name, case in exports.items():
        out, tok = case["out"], case["tok"]
        config = json.loads((out / "config.json").read_text())
        generation = json.loads((out / "generation_config.json").read_text())
        assert config["eos_token_id"] == generation["eos_token_id"] == tok.eod == \
            case["hf"]["eos"] == case["hf"]["config_eos"]
        assert case["hf"]["mask_token"] == "[MASK]" and case["hf"]["mask_id"] == tok.mask_id
        assert ("auto_map" in config) == (name != "ar")
        assert config.get("loss", "ce") == ("score_entropy" if name == "shifted_moe" else "ce")
        assert config["architectures"] == (["LlamaForCausalLM"] if name == "ar" else
                                           ["CascadeForCausalLM"])
        for path in out.iterdir():  # nothing from the machine it was exported on
            if path.suffix in (".json", ".md", ".py"):
                text = path.read_text()
                assert str(out.parent) not in text and "_name_or_path" not in text, path.name


def test_a_diffusion_export_converts_back_bit_exact(exports, tmp_path):
    """hf-to-mcore of an export gets its objective, block size and prediction mode from the
    `cascade` entry, and every weight back unchanged."""
    from cascade_mega.config import load_config
    from test_convert import _weights

    back = tmp_path / "back"
    proc = cascade("convert", "hf-to-mcore", exports["shifted_moe"]["out"], back,
                   "--seq-len", "64")
    assert proc.returncode == 0, proc.stderr
    d = load_config(str(back / "config.yaml"), [], world_size=0).diffusion
    assert (d.objective, d.block_size, d.shifted_prediction, d.loss) == \
        ("block_diffusion", 4, True, "score_entropy")
    first, second = _weights(exports["shifted_moe"]["out"].parent / "shifted_moe_run"), \
        _weights(back)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
