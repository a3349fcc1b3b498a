"""A cascade_mega block-diffusion model in `transformers`: the network, its attention layouts and
its decoding, in plain torch (no import of cascade_mega).

Written into the exported directory by `cascade convert mcore-to-hf`, with the configuration and
the project's decoding policies (`cascade_policies.py`, `cascade_sampling.py`: copies of the
project's own), and loaded with

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # tok.mask_token: [MASK]
    batch = tok(prompts, return_tensors="pt", padding=True)   # left padding
    out = model.generate(**batch, max_new_tokens=64, policy="adaptive", steps=4, tau=0.9)

The network is the Llama / Qwen2 / Qwen3 (and Qwen-MoE) architecture the training used, with its
weight names; what differs from those models is who attends to whom:
- training layout `[x_t ; x_0]` (`block_diffusion_inputs`): x_t rows attend their own block of
  x_t and the clean blocks strictly before it; x_0 rows attend clean blocks up to their own.
  Both halves carry the same positions. A full-diffusion model (block = context) runs x_t alone
  with full attention.
- `forward(input_ids)` without a 4-D mask: one stream under the block-causal mask by position
  (full attention for full diffusion); a 4-D boolean `attention_mask` [b, 1, q, k] (True = may
  attend) replaces it; a 2-D one [b, n] marks padding keys.
- logits of [MASK] and of the embedding's padding rows are -inf (never predicted).

`generate` decodes block by block with an exact KV cache (the project's `cascade generate`): the
prompt's whole blocks are committed in one forward; each block is denoised by forwards over its B
rows attending the cache, a policy deciding some masked positions per forward (`fixed`,
`threshold`, `adaptive`, `entropy`; orders; remasking; greedy or sampled); the decided block is
committed by the next forward, which is also the next block's first denoising step. Sequences of
a batch stop independently at end-of-text or at the token budget. Full-diffusion models decode a
canvas of prompt + [MASK]s semi-autoregressively with Fast-dLLM's prefix / dual cache.

The decoders follow `inference/decode.py` and `inference/full_diffusion.py` step for step, on
purpose: this file may not import the project, and `tests/test_export.py` holds both to the same
tokens (the policies and sampling are not rewritten: they are the project's own files, copied).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .cascade_policies import Policy, decide
from .cascade_sampling import Sampling
from .configuration_cascade import CascadeConfig

IDLE, CLEAN, NOISY = 0, 1, 2


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
        out = step.attend(self.index, rotate(q, cos, sin), rotate(k, cos, sin), v)
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


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


class MaskedStep:
    """A forward under one boolean mask [b, 1, n, n] (True = may attend)."""

    def __init__(self, mask):
        self.mask = mask

    def attend(self, layer, q, k, v):
        return _sdpa(q, k, v, self.mask)


# ------------------------------------------------------------------------------ the layouts
def block_causal_mask(position_ids, block: int):
    """[b, 1, n, n]: key k visible from query q when its block (position // block) is not
    later than q's."""
    blocks = position_ids // block
    return (blocks[:, None, :] <= blocks[:, :, None])[:, None]


def block_diffusion_mask(L: int, B: int, device=None):
    """[2L, 2L] for `[x_t ; x_0]`, written from its definition: an x_t row attends x_t of its own
    block and x_0 of blocks strictly before it; an x_0 row attends x_0 of blocks up to its own."""
    i = torch.arange(2 * L, device=device)
    noisy, block = i < L, (i % L) // B
    q_noisy, k_noisy = noisy[:, None], noisy[None, :]
    qb, kb = block[:, None], block[None, :]
    return (q_noisy & k_noisy & (qb == kb)) | (q_noisy & ~k_noisy & (kb < qb)) | \
        (~q_noisy & ~k_noisy & (kb <= qb))


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

    def _mask(self, input_ids, position_ids, attention_mask):
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.bool()
        if self.config.full_diffusion:
            mask = torch.ones(1, 1, input_ids.shape[1], input_ids.shape[1], dtype=torch.bool,
                              device=input_ids.device)
        else:
            mask = block_causal_mask(position_ids, self.config.block_size)
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
            return {"input_ids": x_t, "position_ids": pos,
                    "attention_mask": torch.ones(b, 1, L, L, dtype=torch.bool, device=x_t.device)}
        mask = block_diffusion_mask(L, self.config.block_size, x_t.device)
        return {"input_ids": torch.cat([x_t, x_0], 1), "position_ids": torch.cat([pos, pos], 1),
                "attention_mask": mask[None, None].expand(b, 1, 2 * L, 2 * L)}

    # ------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=128,
                 policy="adaptive", steps=4, tau=0.9, order="confidence", bound=1.0, remask=0.0,
                 do_sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                 eos_token_id=None, cache="dual", decode_block=32, guidance=0.0, **_unused):
        """Prompts [b, n] (rows padded left or right, `attention_mask` marking the tokens; or a
        list of token lists) -> [b, n + max_new_tokens]: each input row followed by its new
        tokens, end-of-text included, then `pad_token_id` (end-of-text) once the sequence ended.

        policy / steps / tau / order / bound / remask: the unmasking policy (as `cascade
        generate`); do_sample / temperature / top_k / top_p / seed: the sampling knobs (greedy by
        default); full-diffusion models: cache ("none", "prefix", "dual"), decode_block,
        guidance."""
        rows, prompts = self._prompts(input_ids, attention_mask)
        chosen = Policy(policy, steps, tau, order, bound, remask)
        sampling = Sampling(greedy=not do_sample, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed)
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        for i, p in enumerate(prompts):
            if not p or len(p) >= self.config.max_position_embeddings:
                raise ValueError(f"prompt {i} has {len(p)} tokens; the context is "
                                 f"{self.config.max_position_embeddings}")
        self.eval()
        if self.config.full_diffusion:
            decoder = _CanvasDecoder(self, cache, decode_block, guidance)
        else:
            decoder = _BlockDecoder(self)
        new = decoder.generate(prompts, max_new_tokens, chosen, sampling, eos)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else eos
        # assembled on the host (the decoders' bookkeeping lives there), moved once at the end
        out = torch.full((len(rows), rows.shape[1] + max_new_tokens), pad, dtype=torch.long)
        out[:, :rows.shape[1]] = rows
        for i, tokens in enumerate(new):
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


# -------------------------------------------------------------------------- block decoding
class _BlockCache:
    """K/V per layer (made on the device of the first keys); `lengths` is host bookkeeping."""

    def __init__(self, batch: int, max_len: int):
        self.max_len, self.lengths = max_len, torch.zeros(batch, dtype=torch.long)
        self.k, self.v = {}, {}


class _DecodeStep:
    """One decoding forward: each row CLEAN (a committed token: attends the cache and the clean
    rows of blocks up to its own; its K/V join the cache), NOISY (the block being denoised:
    attends the cache, clean rows of earlier blocks and its own block's noisy rows) or IDLE
    (padding: itself only). The cache holds earlier blocks only, so it needs no mask beyond each
    sequence's length."""

    def __init__(self, cache: _BlockCache, kinds, blocks):
        self.cache, self.kinds, self.blocks = cache, kinds, blocks.clamp(min=0)
        self.used = int(cache.lengths.max())
        self.mask, self.pending = None, {}

    def _build_mask(self, device):
        kinds, blocks, n = self.kinds, self.blocks, self.kinds.shape[1]
        qk, kk = kinds[:, :, None], kinds[:, None, :]
        qb, kb = blocks[:, :, None], blocks[:, None, :]
        rows = ((qk == NOISY) & (kk == NOISY) & (qb == kb)) | \
            ((qk == NOISY) & (kk == CLEAN) & (kb < qb)) | ((qk == CLEAN) & (kk == CLEAN) & (kb <= qb))
        rows |= (qk == IDLE) & torch.eye(n, dtype=torch.bool)[None]
        cached = torch.arange(self.used)[None, None, :] < self.cache.lengths[:, None, None]
        cached = cached & (kinds != IDLE)[:, :, None]
        return torch.cat([cached, rows], dim=2)[:, None].to(device)

    def attend(self, layer, q, k, v):
        c = self.cache
        if layer not in c.k:
            shape = (len(c.lengths), k.shape[1], c.max_len, k.shape[3])
            c.k[layer], c.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        keys = torch.cat([c.k[layer][:, :, :self.used], k], dim=2)
        values = torch.cat([c.v[layer][:, :, :self.used], v], dim=2)
        self.pending[layer] = (k, v)
        if self.mask is None:
            self.mask = self._build_mask(q.device)
        return _sdpa(q, keys, values, self.mask)

    def commit(self):
        clean = self.kinds == CLEAN
        counts = clean.sum(dim=1)
        for layer, (k, v) in self.pending.items():
            for i in range(len(counts)):
                if counts[i]:
                    start, rows = int(self.cache.lengths[i]), clean[i].nonzero().squeeze(1)
                    rows = rows.to(k.device)
                    self.cache.k[layer][i, :, start:start + len(rows)] = k[i, :, rows]
                    self.cache.v[layer][i, :, start:start + len(rows)] = v[i, :, rows]
        self.cache.lengths += counts
        self.pending = {}


class _Sequence:
    def __init__(self, prompt, B: int):
        P = len(prompt)
        self.tokens, self.done = [], False
        self.commit, self.commit_start = list(prompt[:P // B * B]), 0
        self.block, self.given = P // B, list(prompt[P // B * B:])
        self.x = self.confidence = self.last_clean = None
        self.end = self.steps = self.cap = 0


class _BlockDecoder:
    def __init__(self, model: CascadeForCausalLM):
        c = model.config
        self.model, self.B, self.mask_id = model, c.block_size, c.mask_token_id
        self.shifted, self.max_len = c.shifted_prediction, c.max_position_embeddings

    def _forward(self, seqs):
        """The rows are laid out on the host (per-sequence state) and cross to the model's
        device in one copy each; the mask likewise (`_DecodeStep._build_mask`)."""
        B, mask_id, dev = self.B, self.mask_id, self.model.device
        width = max(len(s.commit) for s in seqs)
        b, n = len(seqs), width + B
        ids = torch.full((b, n), mask_id, dtype=torch.long)
        pos = torch.zeros((b, n), dtype=torch.long)
        kinds = torch.full((b, n), IDLE, dtype=torch.long)
        blocks = torch.zeros((b, n), dtype=torch.long)
        for i, s in enumerate(seqs):
            c = len(s.commit)
            if c:
                p = torch.arange(s.commit_start, s.commit_start + c)
                ids[i, :c], pos[i, :c], kinds[i, :c], blocks[i, :c] = \
                    torch.tensor(s.commit), p, CLEAN, p // B
            if not s.done:
                p = torch.arange(s.block * B, (s.block + 1) * B)
                ids[i, width:], pos[i, width:], kinds[i, width:], blocks[i, width:] = \
                    s.x, p, NOISY, s.block
        step = _DecodeStep(self.cache, kinds, blocks)
        logits = self.model.logits(self.model.model(ids.to(dev), pos.to(dev), step))
        step.commit()
        for i, s in enumerate(seqs):
            if s.commit:
                s.last_clean = logits[i, len(s.commit) - 1]
                s.commit_start += len(s.commit)
                s.commit = []
        # position r of the block reads row width + r (shifted: the row before it; the block's
        # first position then reads the clean row kept in last_clean)
        index = torch.arange(B) + width - int(self.shifted)
        index[index < width] = -1
        return logits, index

    def _finish(self, s, new):
        if self.eos in new:
            new, s.done = new[:new.index(self.eos) + 1], True  # end-of-text kept in the output
        room = self.max_new - len(s.tokens)
        if len(new) >= room:
            new, s.done = new[:room], True
        s.tokens += new

    def _block_step(self, s, logits, index):
        masked = (s.x[:s.end] == self.mask_id).nonzero().squeeze(1)
        rows = logits[index[masked].clamp(min=0).to(logits.device)]
        if self.shifted and int(masked[0]) == 0 and s.last_clean is not None:
            rows[0] = s.last_clean  # a block's first position: the clean row before it
        chosen, tokens, confidence = decide(self.policy, rows, self.sampling, self.gen,
                                            s.steps, s.cap)
        mine = torch.arange(len(s.given), s.end)
        mine = mine[s.x[mine] != self.mask_id]
        back = mine[self.policy.to_remask(s.confidence[mine], len(chosen), s.steps, s.cap)]
        s.x[masked[chosen]], s.confidence[masked[chosen]] = tokens, confidence
        s.x[back] = self.mask_id
        s.steps += 1
        if bool((s.x[:s.end] == self.mask_id).any()):
            return
        decided = s.x[:s.end].tolist()
        self._finish(s, decided[len(s.given):])
        s.given = []
        if not s.done:
            s.commit, s.block = decided, s.block + 1
            self._start_block(s)

    def _start_block(self, s):
        if s.done:
            return
        if (s.block + 1) * self.B > self.max_len:
            s.done = True
            return
        s.x = torch.full((self.B,), self.mask_id, dtype=torch.long)
        s.x[:len(s.given)] = torch.tensor(s.given, dtype=torch.long)
        s.confidence = torch.ones(self.B)
        s.end = min(self.B, len(s.given) + self.max_new - len(s.tokens))
        s.steps, s.cap = 0, self.policy.steps_for(s.end - len(s.given), self.B)

    def generate(self, prompts, max_new, policy, sampling, eos):
        self.max_new, self.policy, self.sampling, self.eos = max_new, policy, sampling, eos
        self.gen = torch.Generator().manual_seed(sampling.seed)
        self.cache = _BlockCache(len(prompts), self.max_len)
        seqs = [_Sequence(p, self.B) for p in prompts]
        for s in seqs:
            self._start_block(s)
        while not all(s.done for s in seqs):
            logits, index = self._forward(seqs)
            for i, s in enumerate(seqs):
                if not s.done:
                    self._block_step(s, logits[i], index)
        return [s.tokens for s in seqs]


# ------------------------------------------------------------------- full-diffusion decoding
class _CanvasStep:
    """A forward over canvas rows [start, end) of `total`: the keys are the cache with those rows
    replaced by this forward's K/V; `fill` (a forward over the whole canvas) refills the cache."""

    def __init__(self, cache, start, end, total, fill):
        self.cache, self.start, self.end, self.total, self.fill = cache, start, end, total, fill

    def attend(self, layer, q, k, v):
        if self.fill:
            self.cache[layer] = (k, v)
            return _sdpa(q, k, v, None)
        ck, cv = self.cache[layer]
        s, e, t = self.start, self.end, self.total
        return _sdpa(q, torch.cat([ck[:, :, :s], k, ck[:, :, e:t]], dim=2),
                     torch.cat([cv[:, :, :s], v, cv[:, :, e:t]], dim=2), None)


class _CanvasDecoder:
    """Prompt + [MASK]s, decided left to right in blocks of `block` tokens; cache: none (a whole
    canvas every forward), prefix (the block and what follows it, attending the cached prefix)
    or dual (the block alone, attending the cached prefix and suffix)."""

    def __init__(self, model, cache, block, guidance):
        if cache not in ("none", "prefix", "dual") or block < 1 or guidance < 0:
            raise ValueError(f"cache must be none, prefix or dual ({cache!r}), decode_block >= 1 "
                             f"({block}), guidance >= 0 ({guidance})")
        self.model, self.cache_mode, self.block, self.guidance = model, cache, block, guidance
        c = model.config
        self.mask_id, self.shifted, self.max_len = (c.mask_token_id, c.shifted_prediction,
                                                    c.max_position_embeddings)

    def _forward(self, canvas, start, end, fill, rows):
        total = canvas.shape[1]
        lo, hi = (0, total) if fill else (start, end)
        dev = self.model.device
        pos = torch.arange(lo, hi).expand(canvas.shape[0], hi - lo)
        hidden = self.model.model(canvas[:, lo:hi].to(dev), pos.to(dev),
                                  _CanvasStep(self.kv, lo, hi, total, fill))
        return self.model.logits(hidden[:, torch.as_tensor(rows).to(dev) - lo])

    def _block_logits(self, canvas, start, end, first, stale_first):
        shift = int(self.shifted)
        rows = list(range(start - shift, end - shift))
        if first or self.cache_mode == "none":
            return self._forward(canvas, 0, 0, True, rows)
        hi = end if self.cache_mode == "dual" else canvas.shape[1]
        if not shift:
            return self._forward(canvas, start, hi, False, rows)
        rest = self._forward(canvas, start, hi, False, rows[1:]) if rows[1:] else \
            stale_first[:, :0]
        return torch.cat([stale_first, rest], dim=1)

    def generate(self, prompts, max_new, policy, sampling, eos):
        gen = torch.Generator().manual_seed(sampling.seed)
        return [self._one(p, min(max_new, self.max_len - len(p)), policy, sampling, gen, eos)
                for p in prompts]

    def _one(self, prompt, max_new, policy, sampling, gen, eos):
        mask_id, P = self.mask_id, len(prompt)
        canvas = torch.tensor(list(prompt) + [mask_id] * max_new)[None]
        if self.guidance > 0:  # the unconditional canvas: the prompt masked out
            uncond = canvas.clone()
            uncond[0, :P] = mask_id
            canvas = torch.cat([canvas, uncond])
        self.kv, tokens = {}, []
        for start in range(P, P + max_new, self.block):
            end = min(start + self.block, P + max_new)
            steps, stale_first = 0, None
            conf = torch.ones(end - start)
            cap = policy.steps_for(end - start, self.block)
            while bool((canvas[0, start:end] == mask_id).any()):
                logits = self._block_logits(canvas, start, end, steps == 0, stale_first)
                if self.shifted and steps == 0:
                    stale_first = logits[:, :1]
                if self.guidance > 0:
                    g, cond = self.guidance, logits[:1]
                    logits = torch.where(cond.isinf(), cond, (1 + g) * cond - g * logits[1:])
                masked = (canvas[0, start:end] == mask_id).nonzero().squeeze(1)
                chosen, new, confidence = decide(policy, logits[0, masked.to(logits.device)],
                                                 sampling, gen, steps, cap)
                mine = torch.arange(start, end)
                mine = mine[canvas[0, start:end] != mask_id]
                back = mine[policy.to_remask(conf[mine - start], len(chosen), steps, cap)]
                canvas[:, start + masked[chosen]] = new
                conf[masked[chosen]] = confidence
                canvas[:, back] = mask_id
                steps += 1
            decided = canvas[0, start:end].tolist()
            if eos in decided:
                return tokens + decided[:decided.index(eos) + 1]
            tokens += decided
        return tokens
