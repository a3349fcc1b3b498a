"""A cascade_mega block-diffusion model in `transformers`: the network in plain torch (no import of
cascade_mega), and the project's own decoders.

Written into the exported directory by `cascade convert mcore-to-hf`, with the configuration and
the project's decoding core copied beside it (`cascade_decode.py`, `cascade_full_diffusion.py`,
`cascade_kv_cache.py`, `cascade_policies.py`, `cascade_sampling.py`, `cascade_masks.py`,
`cascade_errors.py`: the library's files, their imports made relative), and loaded with

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # tok.mask_token: [MASK]
    batch = tok(prompts, return_tensors="pt", padding=True)   # left padding
    out = model.generate(**batch, max_new_tokens=64, policy="adaptive", steps=4, tau=0.9)

The network is the Llama / Qwen2 / Qwen3 (and Qwen-MoE) architecture the training used, with its
weight names; what differs from those models is who attends to whom, which the project's mask
source (`cascade_masks.AttentionLayout`) says:
- training layout `[x_t ; x_0]` (`block_diffusion_inputs`): x_t rows attend their own block of
  x_t and the clean blocks strictly before it; x_0 rows attend clean blocks up to their own.
  Both halves carry the same positions. A full-diffusion model (block = context) runs x_t alone
  with full attention.
- `forward(input_ids)` without a 4-D mask: one stream under the block-causal mask by position
  (full attention for full diffusion); a 4-D boolean `attention_mask` [b, 1, q, k] (True = may
  attend) replaces it; a 2-D one [b, n] marks padding keys.
- logits of [MASK] and of the embedding's padding rows are -inf (never predicted).

Each attention layer hands its queries, keys and values to a *step* object: `MaskedStep` (a
forward under a mask) or a decoding step of the core (the KV cache and its masks). `generate`
runs the core's decoders on this network through `_Network`, the decoding core's interface
(`inference/network.py` in the project): every policy, order, remasking and sampling knob of
`cascade generate`, with the same tokens (`tests/test_export.py`).
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .cascade_decode import Decoder
from .cascade_full_diffusion import FullDiffusionDecoder
from .cascade_speculative import SpeculativeDecoder  # noqa: F401  (registers its policies)
from .cascade_masks import AttentionLayout
from .cascade_policies import Policy
from .cascade_sampling import Sampling
from .configuration_cascade import CascadeConfig


# ---------------------------------------------------------------------------------- the network
def inverse_frequencies(c: CascadeConfig, device) -> torch.Tensor:
    d = c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    scaling = c.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """Qwen-MoE's layer: softmax router, top-k experts (renormalised with norm_topk_prob), and
    Qwen2-MoE's sigmoid-gated shared expert."""

    def __init__(self, c: CascadeConfig):
        super().__init__()
        self.top_k, self.norm = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(c.hidden_size, c.moe_intermediate_size)
                                     for _ in range(c.num_experts))
        self.shared_expert = None
        if c.shared_expert_intermediate_size:
            self.shared_expert = MLP(c.hidden_size, c.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(c.hidden_size, 1, bias=False)

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if len(rows):
                out.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


class Attention(nn.Module):
    def __init__(self, c: CascadeConfig, index: int):
        super().__init__()
        self.index, self.heads, self.groups, self.d = (index, c.num_attention_heads,
                                                       c.num_key_value_heads, c.head_dim)
        h, g, d = self.heads, self.groups, self.d
        self.q_proj = nn.Linear(c.hidden_size, h * d, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, g * d, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, g * d, bias=c.attention_bias)
        self.o_proj = nn.Linear(h * d, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(d, c.rms_norm_eps)
            self.k_norm = RMSNorm(d, c.rms_norm_eps)

    def forward(self, x, cos, sin, step):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.groups, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.groups, self.d).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        out = step.attend(self.index, rotate(q, cos, sin), rotate(k, cos, sin), v, None, "sdpa")
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.d))


class DecoderLayer(nn.Module):
    def __init__(self, c: CascadeConfig, index: int):
        super().__init__()
        self.self_attn = Attention(c, index)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        sparse = c.num_experts and index not in c.mlp_only_layers and \
            (index + 1) % c.decoder_sparse_step == 0
        self.mlp = Experts(c) if sparse else MLP(c.hidden_size, c.intermediate_size)

    def forward(self, x, cos, sin, step):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class CascadeModel(nn.Module):
    def __init__(self, c: CascadeConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, input_ids, position_ids, step):
        x = self.embed_tokens(input_ids)
        freqs = position_ids.float()[..., None] * inverse_frequencies(self.config, x.device)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [b, 1, n, d]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, step)
        return self.norm(x)


class MaskedStep:
    """A forward under one boolean mask [b, 1, n, n] (True = may attend)."""

    def __init__(self, mask):
        self.mask = mask

    def attend(self, layer, q, k, v, scale=None, kernel="sdpa"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


class CascadeForCausalLM(PreTrainedModel):
    config_class = CascadeConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CascadeConfig):
        super().__init__(config)
        self.model = CascadeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def logits(self, hidden):
        """fp32 logits with [MASK] and the padding rows at -inf."""
        c = self.config
        out = self.lm_head(hidden).float()
        out[..., c.tokenizer_vocab_size:] = float("-inf")
        if c.mask_token_id is not None:
            out[..., c.mask_token_id] = float("-inf")
        return out

    def layout(self, seq_len: int, views: int = 0) -> AttentionLayout:
        """The project's layout of this model over `seq_len` positions: full attention for full
        diffusion; else the clean stream alone (views = 0: block-causal by position, or causal:
        an AR model, with a causal clean stream) or the training layout `[x_t ; x_0]`
        (views = 1)."""
        c = self.config
        if c.full_diffusion:
            return AttentionLayout("full", seq_len, seq_len)
        return AttentionLayout("block_diffusion", seq_len, c.block_size, views=views,
                               clean_stream=getattr(c, "clean_stream", "block_causal"))

    def _mask(self, input_ids, position_ids, attention_mask):
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.bool()
        fn = self.layout(self.config.max_position_embeddings).mask_fn()
        mask = fn(position_ids[:, :, None], position_ids[:, None, :])[:, None]
        if attention_mask is not None:  # [b, n]: 0 marks a padding key
            keys = attention_mask.bool()[:, None, None, :]
            mask = mask & keys | torch.eye(input_ids.shape[1], dtype=torch.bool,
                                           device=input_ids.device)
        return mask

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, **_unused):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        position_ids = position_ids.expand(input_ids.shape[0], -1)
        step = MaskedStep(self._mask(input_ids, position_ids, attention_mask))
        logits = self.logits(self.model(input_ids, position_ids, step))
        return CausalLMOutput(logits=logits)

    def block_diffusion_inputs(self, x_t, x_0=None):
        """The training layout of noisy tokens x_t [b, L] (and clean tokens x_0, for block
        diffusion): the keyword arguments of `forward`; the logits of x_t are its first L rows."""
        b, L = x_t.shape
        pos = torch.arange(L, device=x_t.device)[None].expand(b, L)
        if self.config.full_diffusion:
            mask = self.layout(L).dense(x_t.device)
            return {"input_ids": x_t, "position_ids": pos,
                    "attention_mask": mask[None, None].expand(b, 1, L, L)}
        mask = self.layout(L, views=1).dense(x_t.device)
        return {"input_ids": torch.cat([x_t, x_0], 1), "position_ids": torch.cat([pos, pos], 1),
                "attention_mask": mask[None, None].expand(b, 1, 2 * L, 2 * L)}

    # ------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=128,
                 policy="adaptive", steps=4, tau=0.9, order="confidence", bound=1.0, remask=0.0,
                 draft="fixed", verify=2, redraft=False,
                 do_sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                 eos_token_id=None, cache="dual", decode_block=32, guidance=0.0, **_unused):
        """Prompts [b, n] (rows padded left or right, `attention_mask` marking the tokens; or a
        list of token lists) -> [b, n + max_new_tokens]: each input row followed by its new
        tokens, end-of-text included, then `pad_token_id` (end-of-text) once the sequence ended.

        policy / steps / tau / order / bound / remask / draft / verify / redraft: the unmasking
        policy (as `cascade generate`; `speculative`: `draft` drafts, the causal clean stream
        verifies at most `verify` drafted tokens per forward); do_sample / temperature / top_k / top_p / seed: the sampling knobs (greedy by
        default); full-diffusion models: cache ("none", "prefix", "dual"), decode_block,
        guidance."""
        rows, prompts = self._prompts(input_ids, attention_mask)
        chosen = Policy(policy, steps, tau, order, bound, remask, draft, redraft, verify)
        sampling = Sampling(greedy=not do_sample, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed)
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        net = _Network(self, eos)
        decoder = FullDiffusionDecoder(net, cache, decode_block, guidance) if net.full else \
            Decoder(net)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else eos
        # assembled on the host (the decoders' bookkeeping lives there), moved once at the end
        out = torch.full((len(rows), rows.shape[1] + max_new_tokens), pad, dtype=torch.long)
        out[:, :rows.shape[1]] = rows
        for i, g in enumerate(decoder.generate(prompts, max_new_tokens, chosen, sampling)):
            tokens = (g.tokens + [eos] * (g.stopped == "eod"))[:max_new_tokens]
            out[i, rows.shape[1]:rows.shape[1] + len(tokens)] = torch.tensor(tokens,
                                                                             dtype=torch.long)
        return out.to(self.device)

    @staticmethod
    def _prompts(input_ids, attention_mask):
        """Host copies of the prompts (the decoders keep their state on the host)."""
        if isinstance(input_ids, (list, tuple)):
            width = max(len(p) for p in input_ids)
            rows = torch.zeros(len(input_ids), width, dtype=torch.long)
            for i, p in enumerate(input_ids):
                rows[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            return rows, [list(p) for p in input_ids]
        rows = input_ids.detach().cpu()
        keep = torch.ones_like(rows, dtype=torch.bool) if attention_mask is None else \
            attention_mask.detach().cpu().bool()
        return rows, [r[k].tolist() for r, k in zip(rows, keep)]


class _Network:
    """This model as the decoding core's network: its facts from the config, one forward that
    returns the logits of the rows asked for (the decoding step in each attention layer)."""

    causal, time_conditioning, flex = False, False, None

    def __init__(self, model: CascadeForCausalLM, eos: int):
        c = model.config
        self.model, self.eod, self.mask_id = model, eos, c.mask_token_id
        self.max_len, self.block_size = c.max_position_embeddings, c.block_size
        self.full, self.shifted = c.full_diffusion, bool(c.shifted_prediction)
        self.clean_stream = c.clean_stream
        self.ar_trained = c.ar_loss_weight > 0
        self.scores = c.loss == "score_entropy"
        self.device = model.device

    def logits(self, ids, pos, step, rows, levels):
        return self.model.logits(self.model.model(ids, pos, step)[:, rows])

    @contextmanager
    def decoding(self):
        self.model.eval()
        yield

    def detokenize(self, tokens):
        return ""
