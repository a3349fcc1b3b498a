"""`cascade convert mcore-to-hf`: a run as a Hugging Face model directory that people can use
elsewhere.

AR runs export as the plain architecture that holds them (Llama, Qwen2, Qwen3, Qwen-MoE):
`transformers` runs them as they are. Block-diffusion and full-diffusion runs export as the same
weights under `CascadeForCausalLM`, the project's own modeling code written into the directory
(`convert/remote/`: plain torch + transformers, no import of cascade_mega), which
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads: its attention follows
the block-diffusion layouts and its `generate()` runs the project's decoding core: the decoders,
KV cache, policies, sampling and mask source are copied from the library at export, their imports
made relative (`CORE`; `inference/network.py` says what the core asks of a network), so they
cannot drift from `cascade generate`.

Every export holds: safetensors shards (at most --max-shard-gb each), `config.json` and
`generation_config.json` with one end-of-text id (the tokenizer's end of document) and nothing
from the local filesystem, the tokenizer with the project's `[MASK]` and end-of-text tokens
(`tokenizer.json`, `tokenizer_config.json`: `AutoTokenizer` gives `mask_token == "[MASK]"`,
left padding for batched generation), and a README. The embedding keeps every row of the
megatron table, so `hf-to-mcore` of the directory is bit-exact (the `cascade` entry of config.json
brings the objective, block size and prediction mode back).
"""

from __future__ import annotations

import json
import os
import re
import shutil

from cascade_mega.config import ConfigError
from cascade_mega.config.objectives import layout_of
from cascade_mega.convert import hf as hfmap
from cascade_mega.convert.staging import progress, staged
from cascade_mega.inference.policies import ORDERS, POLICIES

REMOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")
# the decoding core, copied into a diffusion export: library module -> module in the export
CORE = {"cascade_mega.errors": "cascade_errors",
        "cascade_mega.diffusion.masks": "cascade_masks",
        "cascade_mega.inference.sampling": "cascade_sampling",
        "cascade_mega.inference.policies": "cascade_policies",
        "cascade_mega.inference.kv_cache": "cascade_kv_cache",
        "cascade_mega.inference.decode": "cascade_decode",
        "cascade_mega.inference.speculative": "cascade_speculative",
        "cascade_mega.inference.full_diffusion": "cascade_full_diffusion"}
AUTO_MAP = {"AutoConfig": "configuration_cascade.CascadeConfig",
            "AutoModelForCausalLM": "modeling_cascade.CascadeForCausalLM"}
# keys a config must not carry out of this machine (transformers writes the folder it read from)
LOCAL_KEYS = ("_name_or_path", "name_or_path", "_commit_hash")


def _hf_config(cfg, run_dir: str, rows: int, tokenizer) -> dict:
    """The run in Hugging Face's terms: the source model's config (a converted run) or a
    description of the model trained here, with the run's rows, end-of-text and objective."""
    base_path = os.path.join(run_dir, "hf_config.json")
    if os.path.isfile(base_path):
        with open(base_path) as f:
            hf = json.load(f)
    else:  # trained here: describe it in Hugging Face's terms
        hf = _describe(cfg)
    hf = {k: v for k, v in hf.items() if k not in LOCAL_KEYS}
    hf.update(vocab_size=rows, torch_dtype="float32", dtype="float32",
              eos_token_id=tokenizer.eod, pad_token_id=tokenizer.eod)
    d, layout = cfg.diffusion, layout_of(cfg)
    hf["cascade"] = {"objective": d.objective, "block_size": layout.block,
                     "shifted_prediction": bool(d.shifted_prediction and not layout.causal),
                     "loss": d.loss, "clean_stream": d.clean_stream,
                     "ar_loss_weight": d.ar_loss_weight}
    return hf


def _remote_config(hf: dict, cfg, tokenizer) -> dict:
    """config.json of a diffusion export: the backbone's fields, read by `CascadeConfig`."""
    m = cfg.model
    out = {k: v for k, v in hf.items() if k not in
           ("architectures", "model_type", "rope_parameters", "rope_scaling", "rope_theta")}
    scaling = None
    if m.rope_scaling:
        scaling = {"rope_type": "llama3", "factor": m.rope_scaling_factor, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    out.update(
        architectures=["CascadeForCausalLM"], model_type="cascade", auto_map=AUTO_MAP,
        backbone=hfmap.family(hf), objective="block_diffusion",
        block_size=layout_of(cfg).block,
        shifted_prediction=bool(cfg.diffusion.shifted_prediction), loss=cfg.diffusion.loss,
        clean_stream=cfg.diffusion.clean_stream, ar_loss_weight=cfg.diffusion.ar_loss_weight,
        mask_token_id=tokenizer.mask_id, tokenizer_vocab_size=tokenizer.vocab_size,
        max_position_embeddings=cfg.data.seq_len, rope_theta=m.rotary_base, rope_scaling=scaling,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
        attention_bias=bool(m.qkv_bias), qk_norm=bool(m.qk_norm),
        tie_word_embeddings=bool(m.tie_embeddings), num_experts=hfmap.num_experts(hf),
        mlp_only_layers=[i for i, on in enumerate(hfmap.sparse_layers(hf)) if not on],
        decoder_sparse_step=1)
    out["cascade"] = {**hf["cascade"], "architecture": hf["architectures"][0],
                      "model_type": hf["model_type"]}
    return out


def _write_remote_code(partial: str) -> None:
    """The modeling code, and the project's decoding core as it is now."""
    import importlib

    for name in ("configuration_cascade.py", "modeling_cascade.py"):
        shutil.copy(os.path.join(REMOTE, name), os.path.join(partial, name))
    for module, local in CORE.items():
        text = open(importlib.import_module(module).__file__).read()
        for other, there in CORE.items():
            text = re.sub(rf"^(\s*)from {re.escape(other)} import", rf"\1from .{there} import",
                          text, flags=re.M)
        if re.search(r"^\s*(from|import)\s+cascade_(mega|kernels|launchers)\b", text, re.M):
            raise ConfigError(f"{local}.py would import the project: the decoding core must "
                              "import only itself, the mask source and the error base")
        with open(os.path.join(partial, local + ".py"), "w") as f:
            f.write(text)


def _write_tokenizer(tokenizer, partial: str, seq_len: int) -> None:
    """tokenizer.json with the project's special tokens, and the files `AutoTokenizer` reads."""
    from cascade_mega.data.tokenizer import MASK_TOKEN, CascadeTokenizer

    path = os.path.join(partial, "tokenizer.json")
    if not isinstance(tokenizer, CascadeTokenizer):  # a .tiktoken vocabulary: as it is
        shutil.copy(tokenizer.path, path)
        return
    tokenizer.save(path)
    eod = tokenizer.decode([tokenizer.eod])
    special = {"eos_token": eod, "pad_token": eod, "mask_token": MASK_TOKEN}
    with open(os.path.join(partial, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **special,
                   "padding_side": "left", "model_max_length": seq_len,
                   "clean_up_tokenization_spaces": False}, f, indent=2)
    with open(os.path.join(partial, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)


def mcore_to_hf(args) -> str:
    from safetensors.torch import save_file

    from cascade_mega.inference.load import load_model
    from cascade_mega.checkpoint import locate

    cfg, tokenizer, model = load_model(args.source)
    run_dir = os.path.dirname(locate(args.source)[0])
    # the tensors are written from the host (the model was loaded on the process's device)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()
             if not k.endswith("_extra_state")}
    rows = state["embedding.word_embeddings.weight"].shape[0]
    hf = _hf_config(cfg, run_dir, rows, tokenizer)
    diffusion = not layout_of(cfg).causal
    config = _remote_config(hf, cfg, tokenizer) if diffusion else hf
    tensors = list(hfmap.megatron_to_hf(state, hf))
    limit = args.max_shard_gb * 1024 ** 3
    shards, size = [[]], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    with staged(args.out) as partial:
        weight_map = {}
        with progress(len(tensors), "mcore-to-hf") as bar:
            for i, shard in enumerate(shards):
                fname = "model.safetensors" if len(shards) == 1 else \
                    f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: t.contiguous() for n, t in shard},
                          os.path.join(partial, fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n, _ in shard})
                bar.update(len(shard))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for _, t in tensors)
            with open(os.path.join(partial, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2)
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        # the project's added tokens and the padding rows are never predicted (the megatron model
        # masks them with -inf logits); transformers' generate does the same through this list
        banned = [tokenizer.mask_id] + list(range(tokenizer.vocab_size, rows))
        with open(os.path.join(partial, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.eod,
                       "suppress_tokens": banned, "do_sample": False}, f, indent=2)
        _write_tokenizer(tokenizer, partial, cfg.data.seq_len)
        if diffusion:
            _write_remote_code(partial)
        with open(os.path.join(partial, "README.md"), "w") as f:
            f.write(_model_card(cfg, config, tokenizer))
    return os.path.abspath(args.out)


def _model_card(cfg, config: dict, tokenizer) -> str:
    name = config["architectures"][0]
    if layout_of(cfg).causal:
        return f"""# {cfg.name}

An autoregressive {name} trained with cascade_mega: `transformers` runs it as it is
(`AutoModelForCausalLM.from_pretrained(DIR)`); end of text is id {tokenizer.eod}.
"""
    policies, orders = ", ".join(POLICIES), ", ".join(ORDERS)
    kind = "full-diffusion" if layout_of(cfg).kind == "full" else \
        f"block-diffusion (block size {config['block_size']})"
    return f"""# {cfg.name}

A {kind} language model trained with cascade_mega on a {config['cascade']['architecture']}
backbone, context {cfg.data.seq_len} tokens. Its modeling code is in this directory:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # mask_token "[MASK]"
batch = tok(["ROMEO:", "JULIET: O"], return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=64)         # greedy, adaptive policy
print(tok.batch_decode(out[:, batch["input_ids"].shape[1]:]))
```

`generate` knobs (as `cascade generate`): `policy` ({policies}), `steps`,
`tau`, `order` ({orders}), `bound`, `remask`, `do_sample`, `temperature`, `top_k`, `top_p`, `seed`; for
full-diffusion models `cache` (none, prefix, dual), `decode_block`, `guidance`. `forward` scores
one stream under the block-causal mask; `block_diffusion_inputs(x_t, x_0)` builds the training
layout. `[MASK]` is id {tokenizer.mask_id}, end of text id {tokenizer.eod}.
"""


def _describe(cfg) -> dict:
    """A model trained here as the Hugging Face architecture that holds it: Llama, Qwen2 (QKV
    biases), Qwen3 (per-head query / key norms), Qwen3-MoE (experts and query / key norms) or
    Qwen2-MoE (experts and a gated shared expert)."""
    from cascade_mega.model.gpt import ffn_size

    m, moe = cfg.model, cfg.model.moe
    if m.time_conditioning:
        raise ConfigError("a time-conditioned model (model.time_conditioning) has no Hugging "
                          "Face architecture to export to: the exported code has no noise-level "
                          "embedding (it stays a cascade checkpoint: generate, eval, convert "
                          "mcore-to-mcore)")
    if moe.enabled:
        kind = "qwen3_moe" if m.qk_norm and not moe.shared_expert_size else \
            "qwen2_moe" if moe.shared_expert_gate and not m.qk_norm else None
        if kind is None or moe.score_function != "softmax" or moe.expert_bias or \
                (kind == "qwen2_moe" and not m.qkv_bias):
            raise ConfigError("this MoE model has no Hugging Face architecture to export to "
                              "(Qwen3-MoE: query / key norms, no shared expert; Qwen2-MoE: a "
                              "gated shared expert, QKV biases, no query / key norms; both "
                              "softmax routing without an expert bias)")
    else:
        kind = "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias else "llama"
    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "qwen2_moe": "Qwen2Moe",
             "qwen3_moe": "Qwen3Moe"}
    hf = {"architectures": [f"{names[kind]}ForCausalLM"], "model_type": kind,
          "hidden_act": "silu", "hidden_size": m.hidden_size, "intermediate_size": ffn_size(cfg),
          "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
          "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
          "head_dim": m.kv_channels or m.hidden_size // m.num_attention_heads,
          "rms_norm_eps": m.norm_epsilon, "tie_word_embeddings": m.tie_embeddings,
          "max_position_embeddings": cfg.data.seq_len, "rope_theta": m.rotary_base,
          "attention_bias": m.qkv_bias if kind.startswith("qwen3") else False}
    if m.rope_scaling:
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_scaling_factor,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    if moe.enabled:
        pattern = m.moe_pattern
        hf.update(num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                  moe_intermediate_size=moe.ffn_hidden_size or ffn_size(cfg),
                  norm_topk_prob=moe.norm_topk_prob, decoder_sparse_step=1,
                  mlp_only_layers=[i for i, on in enumerate(pattern) if not on],
                  router_aux_loss_coef=moe.aux_loss_coeff)
        if kind == "qwen2_moe":
            hf["shared_expert_intermediate_size"] = moe.shared_expert_size
    return hf
