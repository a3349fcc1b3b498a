"""Hugging Face Llama / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE checkpoints and the project's
megatron-core model, tensor by tensor.

The architectures map one to one (`model/gpt.py`: RMSNorm, SwiGLU, RoPE in rotate-half form,
grouped-query attention, Qwen2's QKV biases, Qwen3's per-head query / key RMSNorm and head
dimension, tied or untied embeddings; `model/moe.py`: the router, the experts, Qwen2-MoE's
gated shared expert, the layers that keep a dense MLP). Tensors that change shape:
- megatron's `linear_qkv` stacks, per query group, that group's query heads then its key and its
  value head: [g x (a/g + 2) x d, h]; Hugging Face keeps q_proj, k_proj, v_proj apart.
- megatron's `linear_fc1` is [gate ; up]; Hugging Face keeps gate_proj and up_proj apart (an
  expert's too), except in the fused expert layout recent `transformers` can save, one
  `experts.gate_up_proj` [E, 2f, h] ([gate ; up] per expert) and `experts.down_proj` [E, h, f]
  per layer: both are read, the per-expert layout of published checkpoints is written.
The embedding table (and an untied output layer) gains rows for the tokens the project adds after
the model's vocabulary (`[MASK]`, and an end-of-document token where the tokenizer has none) and
for padding: the added rows (and [MASK]'s, where the table already had an unused row for its id)
start at the mean of the pretrained rows, a neutral start the continued pretraining moves
([MASK] is never predicted); padding rows are zero (never predicted).

Hugging Face weights are read lazily (`safetensors.safe_open`), one tensor at a time, from one
file or a sharded index.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Tuple

import torch

from cascade_mega.config import ConfigError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Qwen2MoeForCausalLM": "qwen2_moe",
                 "Qwen3MoeForCausalLM": "qwen3_moe"}


# what a diffusion export's config.json adds for its modeling code (convert/export.py)
REMOTE_KEYS = ("auto_map", "backbone", "objective", "block_size", "shifted_prediction",
               "clean_stream", "ar_loss_weight", "mask_token_id", "tokenizer_vocab_size",
               "qk_norm")


def family(hf: dict) -> str:
    return ARCHITECTURES[hf["architectures"][0]]


def num_experts(hf: dict) -> int:
    return hf.get("num_experts") or hf.get("num_local_experts") or 0


def sparse_layers(hf: dict) -> List[int]:
    """1 for each layer with experts (Qwen-MoE: not in `mlp_only_layers`, and every
    `decoder_sparse_step`-th), 0 for a dense MLP."""
    n = hf["num_hidden_layers"]
    if not family(hf).endswith("_moe") or not num_experts(hf):
        return [0] * n
    step, dense = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or [])
    return [int(i not in dense and (i + 1) % step == 0) for i in range(n)]


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path}: not a JSON file ({str(err).splitlines()[0]})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: holds a {type(hf).__name__}, not a model config object")
    arch = (hf.get("architectures") or ["?"])[0]
    if arch == "CascadeForCausalLM":  # a diffusion export: its backbone, as that model's config
        inner = hf.get("cascade") or {}
        if "architecture" not in inner:
            raise ConfigError(f"{path}: a CascadeForCausalLM config without its backbone "
                              "(the 'cascade' entry names it)")
        hf = {k: v for k, v in hf.items() if k not in REMOTE_KEYS}
        hf.update(architectures=[inner["architecture"]], model_type=inner["model_type"])
        arch = inner["architecture"]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{hf_dir}: architecture {arch} is not supported: expected one of "
                          f"{', '.join(ARCHITECTURES)}")
    return hf


def _rope(hf: dict) -> Tuple[float, str | None, float]:
    """(theta, scaling type or None, factor), from `rope_parameters` (transformers 5) or the
    older `rope_theta` / `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    merged = {**scaling, **params}
    if kind == "default":
        return float(theta), None, 1.0
    if kind == "llama3" and merged.get("low_freq_factor", 1) == 1 and \
            merged.get("high_freq_factor", 4) == 4 and \
            merged.get("original_max_position_embeddings", 8192) == 8192:
        return float(theta), "llama3", float(merged.get("factor", 8.0))
    raise ConfigError(f"RoPE scaling {kind!r} with {merged} is not supported (default, or llama3 "
                      "with low/high frequency factors 1/4 and 8192 original positions)")


def model_overrides(hf: dict) -> List[str]:
    """The run config's `model.*` for this Hugging Face config."""
    kind, heads = family(hf), hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if kind in ("llama", "qwen2", "qwen2_moe") and head_dim * heads != hf["hidden_size"]:
        raise ConfigError(f"head_dim {head_dim} x {heads} heads != hidden_size "
                          f"{hf['hidden_size']}: not supported for {kind}")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise ConfigError("only SwiGLU MLPs without biases are supported")
    if kind != "llama" and hf.get("use_sliding_window"):
        raise ConfigError(f"{kind} sliding-window attention is not supported")
    if kind == "llama" and hf.get("attention_bias"):
        raise ConfigError("Llama attention biases are not supported")
    bias = kind in ("qwen2", "qwen2_moe") or (kind.startswith("qwen3") and
                                              bool(hf.get("attention_bias")))
    theta, scaling, factor = _rope(hf)
    over = [f"model.num_layers={hf['num_hidden_layers']}",
            f"model.hidden_size={hf['hidden_size']}",
            f"model.num_attention_heads={heads}",
            f"model.num_query_groups={hf.get('num_key_value_heads') or heads}",
            f"model.ffn_hidden_size={hf['intermediate_size']}",
            f"model.tie_embeddings={bool(hf.get('tie_word_embeddings', False))}",
            f"model.rotary_base={theta}", f"model.norm_epsilon={hf['rms_norm_eps']}",
            f"model.qkv_bias={bias}", f"model.rope_scaling={scaling or 'null'}",
            f"model.rope_scaling_factor={factor}", f"model.qk_norm={kind.startswith('qwen3')}"]
    if head_dim * heads != hf["hidden_size"]:
        over.append(f"model.kv_channels={head_dim}")
    if any(sparse_layers(hf)):
        shared = (hf.get("shared_expert_intermediate_size") or 0) if kind == "qwen2_moe" else 0
        pattern = ",".join(map(str, sparse_layers(hf)))
        over += [f"model.moe.num_experts={num_experts(hf)}",
                 f"model.moe.top_k={hf['num_experts_per_tok']}",
                 f"model.moe.ffn_hidden_size={hf['moe_intermediate_size']}",
                 f"model.moe.norm_topk_prob={bool(hf.get('norm_topk_prob', False))}",
                 f"model.moe.shared_expert_size={shared}",
                 f"model.moe.shared_expert_gate={bool(shared)}",
                 f"model.moe.aux_loss_coeff={hf.get('router_aux_loss_coef', 1e-3)}"]
        if not all(sparse_layers(hf)):  # some layers keep a dense MLP
            over.append(f"model.moe.pattern=[{pattern}]")
    return over


def _readable(path: str):
    """`safe_open(path)`, a file that is not safetensors named in one message."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path}: not a safetensors file ({err})") from None


class HFReader:
    """Tensors of a Hugging Face checkpoint by name, opened lazily (sharded or not)."""

    def __init__(self, hf_dir: str):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                self.where = {k: os.path.join(hf_dir, v) for k, v in
                              json.load(f)["weight_map"].items()}
        elif os.path.isfile(single):
            with _readable(single) as f:
                self.where = {k: single for k in f.keys()}
        else:
            raise ConfigError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self._open = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConfigError(f"the checkpoint has no tensor {name}")
        path = self.where[name]
        if path not in self._open:
            self._open = {path: _readable(path)}  # one file open at a time
        return self._open[path].get_tensor(name)

    def files(self) -> List[str]:
        return sorted(set(self.where.values()))


def _layer_map(i: int, hf: dict) -> Dict[str, str]:
    """megatron name -> Hugging Face name, for the layer's tensors that map as they are."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    names = {m + "input_layernorm.weight": h + "input_layernorm.weight",
             m + "self_attention.linear_proj.weight": h + "self_attn.o_proj.weight",
             m + "pre_mlp_layernorm.weight": h + "post_attention_layernorm.weight"}
    if family(hf).startswith("qwen3"):
        names[m + "self_attention.q_layernorm.weight"] = h + "self_attn.q_norm.weight"
        names[m + "self_attention.k_layernorm.weight"] = h + "self_attn.k_norm.weight"
    if not sparse_layers(hf)[i]:
        names[m + "mlp.linear_fc2.weight"] = h + "mlp.down_proj.weight"
        return names
    names[m + "mlp.router.weight"] = h + "mlp.gate.weight"
    if family(hf) == "qwen2_moe":
        names[m + "mlp.shared_experts.linear_fc2.weight"] = h + "mlp.shared_expert.down_proj.weight"
        names[m + "mlp.shared_experts.gate_weight"] = h + "mlp.shared_expert_gate.weight"
    return names


def _fc1(i: int, hf: dict) -> Dict[str, str]:
    """megatron `linear_fc1` ([gate ; up]) -> the Hugging Face MLP prefix holding gate_proj
    and up_proj: the dense MLP, or each expert and the shared expert (per-expert layout)."""
    m, h = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
    if not sparse_layers(hf)[i]:
        return {m + "linear_fc1.weight": h}
    out = {f"{m}experts.local_experts.{e}.linear_fc1.weight": f"{h}experts.{e}."
           for e in range(num_experts(hf))}
    if family(hf) == "qwen2_moe":
        out[m + "shared_experts.linear_fc1.weight"] = h + "shared_expert."
    return out


def _read_experts(reader: "HFReader", i: int, hf: dict) -> Iterator[tuple]:
    """(megatron name, tensor) of layer i's experts, from the per-expert or the fused layout."""
    m, h = f"decoder.layers.{i}.mlp.experts.local_experts.", f"model.layers.{i}.mlp.experts."
    if h + "gate_up_proj" in reader:
        gate_up = reader.get(h + "gate_up_proj")  # [E, 2f, h]
        for e in range(num_experts(hf)):
            yield f"{m}{e}.linear_fc1.weight", gate_up[e]
        down = reader.get(h + "down_proj")  # [E, h, f]
        for e in range(num_experts(hf)):
            yield f"{m}{e}.linear_fc2.weight", down[e]
        return
    for e in range(num_experts(hf)):
        yield f"{m}{e}.linear_fc1.weight", torch.cat(
            [reader.get(f"{h}{e}.gate_proj.weight"), reader.get(f"{h}{e}.up_proj.weight")], 0)
        yield f"{m}{e}.linear_fc2.weight", reader.get(f"{h}{e}.down_proj.weight")


def pack_qkv(q, k, v, groups: int) -> torch.Tensor:
    """[a d, ...], [g d, ...], [g d, ...] -> megatron's per-group [q..., k, v] stacking."""
    qs, ks, vs = q.chunk(groups, 0), k.chunk(groups, 0), v.chunk(groups, 0)
    return torch.cat([torch.cat(t, 0) for t in zip(qs, ks, vs)], 0)


def unpack_qkv(qkv, heads: int, groups: int):
    d = qkv.shape[0] // (heads + 2 * groups)
    per = qkv.view(groups, (heads // groups + 2) * d, *qkv.shape[1:])
    q, k, v = per.split([heads // groups * d, d, d], dim=1)
    flat = (-1, *qkv.shape[1:])
    return q.reshape(flat), k.reshape(flat), v.reshape(flat)


def _rows(table: torch.Tensor, padded: int, vocab: int, mask_id) -> torch.Tensor:
    """The checkpoint's rows, then rows at their mean up to the tokenizer's `vocab` (and the
    `[MASK]` row at the mean, where the table had an unused row there), zeros up to `padded`."""
    out = torch.zeros(padded, table.shape[1], dtype=table.dtype)
    out[: len(table)] = table
    mean = table.mean(0, dtype=torch.float64).to(table.dtype)
    out[len(table): vocab] = mean
    if mask_id is not None:
        out[mask_id] = mean
    return out


def hf_to_megatron(reader: HFReader, hf: dict, vocab: int, padded: int,
                   mask_id=None) -> Iterator[tuple]:
    """(megatron name, tensor) for every weight. vocab: the tokenizer's size with the tokens the
    project adds; padded: the model's embedding rows; mask_id: the [MASK] row to initialise
    (None when the checkpoint already holds a trained one)."""
    layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    if hf["vocab_size"] > padded:
        raise ConfigError(f"the model's vocabulary ({hf['vocab_size']}) exceeds {padded} rows")
    yield "embedding.word_embeddings.weight", _rows(reader.get("model.embed_tokens.weight"),
                                                    padded, vocab, mask_id)
    for i in range(layers):
        for m, h in _layer_map(i, hf).items():
            yield m, reader.get(h)
        a = f"model.layers.{i}.self_attn."
        yield f"decoder.layers.{i}.self_attention.linear_qkv.weight", pack_qkv(
            reader.get(a + "q_proj.weight"), reader.get(a + "k_proj.weight"),
            reader.get(a + "v_proj.weight"), groups)
        if a + "q_proj.bias" in reader:
            yield f"decoder.layers.{i}.self_attention.linear_qkv.bias", pack_qkv(
                reader.get(a + "q_proj.bias"), reader.get(a + "k_proj.bias"),
                reader.get(a + "v_proj.bias"), groups)
        if sparse_layers(hf)[i]:
            yield from _read_experts(reader, i, hf)
        for m, p in _fc1(i, hf).items():
            if ".local_experts." not in m:  # the experts' came with their fc2 above
                yield m, torch.cat([reader.get(p + "gate_proj.weight"),
                                    reader.get(p + "up_proj.weight")], 0)
    yield "decoder.final_layernorm.weight", reader.get("model.norm.weight")
    if not hf.get("tie_word_embeddings", False):
        yield "output_layer.weight", _rows(reader.get("lm_head.weight"), padded, vocab, mask_id)


def megatron_to_hf(state: Dict[str, torch.Tensor], hf: dict) -> Iterator[tuple]:
    """(Hugging Face name, tensor) from a TP=1 megatron state dict (`hf['vocab_size']` rows of
    the embedding: all of them, for a bit-exact way back)."""
    layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    V = hf["vocab_size"]
    yield "model.embed_tokens.weight", state["embedding.word_embeddings.weight"][:V]
    for i in range(layers):
        for m, h in _layer_map(i, hf).items():
            yield h, state[m]
        for m, p in _fc1(i, hf).items():
            gate, up = state[m].chunk(2, 0)
            yield p + "gate_proj.weight", gate
            yield p + "up_proj.weight", up
        if sparse_layers(hf)[i]:
            mlp = f"decoder.layers.{i}.mlp.experts.local_experts."
            for e in range(num_experts(hf)):
                yield f"model.layers.{i}.mlp.experts.{e}.down_proj.weight", \
                    state[f"{mlp}{e}.linear_fc2.weight"]
        a, m = f"model.layers.{i}.self_attn.", f"decoder.layers.{i}."
        for suffix in ("weight", "bias"):
            key = f"{m}self_attention.linear_qkv.{suffix}"
            if key in state:
                q, k, v = unpack_qkv(state[key], heads, groups)
                yield a + f"q_proj.{suffix}", q
                yield a + f"k_proj.{suffix}", k
                yield a + f"v_proj.{suffix}", v
    yield "model.norm.weight", state["decoder.final_layernorm.weight"]
    if not hf.get("tie_word_embeddings", False):
        yield "lm_head.weight", state["output_layer.weight"][:V]
