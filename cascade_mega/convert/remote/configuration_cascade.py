"""The configuration of a cascade_mega model exported to Hugging Face's format.

Written into the exported directory by `cascade convert mcore-to-hf` and loaded by `transformers`
with `trust_remote_code=True`; it needs `transformers` only. The backbone fields are Llama's /
Qwen2's / Qwen3's (and Qwen-MoE's for expert layers), so the weights keep those models' names;
the `cascade` fields say how the network was trained and how it decodes.
"""

from transformers import PretrainedConfig


class CascadeConfig(PretrainedConfig):
    model_type = "cascade"

    def __init__(self, vocab_size=32000, hidden_size=512, intermediate_size=1408,
                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=None,
                 head_dim=None, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                 attention_bias=False, qk_norm=False, max_position_embeddings=2048,
                 tie_word_embeddings=False, backbone="llama", objective="block_diffusion",
                 block_size=16, shifted_prediction=False, loss="ce", mask_token_id=None,
                 clean_stream="block_causal", ar_loss_weight=0.0,
                 tokenizer_vocab_size=None, num_experts=0, num_experts_per_tok=1,
                 moe_intermediate_size=None, norm_topk_prob=False, mlp_only_layers=None,
                 decoder_sparse_step=1, shared_expert_intermediate_size=0, **kwargs):
        self.vocab_size = vocab_size  # rows of the embedding (the tokenizer's ids, padded)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling  # None, or Llama 3's {"rope_type": "llama3", ...}
        self.attention_bias = attention_bias  # QKV biases (Qwen2)
        self.qk_norm = qk_norm  # per-head query / key RMSNorm (Qwen3)
        self.max_position_embeddings = max_position_embeddings
        self.backbone = backbone  # the architecture the weights follow: llama, qwen2, qwen3, ...
        # "block_diffusion" (block_size < max_position_embeddings), or full diffusion when
        # block_size == max_position_embeddings
        self.objective = objective
        self.block_size = block_size
        # position i predicted from row i - 1 (a block's first from the clean row before it)
        self.shifted_prediction = shifted_prediction
        # how the clean stream attends to itself: block_causal, or causal (an AR model, trained
        # with the next-token loss weight `ar_loss_weight`: 0 means it never was)
        self.clean_stream = clean_stream
        self.ar_loss_weight = ar_loss_weight
        # "score_entropy": the logits are SEDD's scores (read by the `tweedie` policy)
        self.loss = loss
        self.mask_token_id = mask_token_id  # the absorbing state; never predicted
        # ids at or above this are embedding padding; never predicted
        self.tokenizer_vocab_size = tokenizer_vocab_size or vocab_size
        self.num_experts = num_experts  # 0: every MLP dense
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.mlp_only_layers = list(mlp_only_layers or [])
        self.decoder_sparse_step = decoder_sparse_step
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def full_diffusion(self) -> bool:
        return self.block_size >= self.max_position_embeddings
