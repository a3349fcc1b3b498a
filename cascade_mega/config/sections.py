"""The run configuration's sections: typed dataclasses, each checking its own fields
(`Section.check`); the rules between sections are in `rules.py`, loading in `load.py`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING

from cascade_mega.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration the run cannot use; the message names the offending key."""


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def weights(default):
    """A field that shapes the weights: a checkpoint saved under another value does not load
    into this config (`checkpoint: check_architecture`, which reads `weight_keys`)."""
    return field(default=default, metadata={"shapes_weights": True})


def weight_keys(cls=None, prefix: str = "") -> tuple:
    """The dotted keys of every field marked by `weights`, e.g. 'model.num_layers'."""
    import dataclasses

    out = []
    for f in dataclasses.fields(cls or CascadeConfig):
        if f.metadata.get("shapes_weights"):
            out.append(prefix + f.name)
        elif f.default_factory is not dataclasses.MISSING and \
                dataclasses.is_dataclass(f.default_factory):
            out += weight_keys(f.default_factory, f"{prefix}{f.name}.")
    return tuple(out)


class Section:
    """A config section that checks its own fields (`check`): its choices (`_CHOICES`), then the
    rules of `_check`. Rules between sections live in `validate`."""

    NAME = ""
    POSITIVE: tuple = ()  # fields that must be > 0

    def check(self) -> None:
        for key, choices in _CHOICES.items():
            section, leaf = key.rsplit(".", 1)
            if section == self.NAME:
                value = getattr(self, leaf)
                need(value in choices, f"'{key}' = {value!r}; expected one of "
                     f"{', '.join(choices)}")
        for leaf in self.POSITIVE:
            value = getattr(self, leaf)
            need(value > 0, f"'{self.NAME}.{leaf}' must be positive, got {value}")
        self._check()

    def _check(self) -> None:
        pass


@dataclass
class MoEConfig(Section):
    """`model.moe`: mixture-of-experts MLPs through megatron-core's `MoELayer` (its router,
    token dispatcher and experts; `model/moe.py`). Unset `num_experts`: a dense model."""

    NAME, POSITIVE = "model.moe", ("top_k",)

    num_experts: Optional[int] = weights(None)
    top_k: int = 2
    ffn_hidden_size: Optional[int] = weights(None)  # each expert's FFN; None: model.ffn_hidden_size
    # FFN size of an always-on shared expert (Qwen2-MoE); 0: none
    shared_expert_size: int = weights(0)
    shared_expert_gate: bool = weights(False)  # the shared expert's output scaled by a sigmoid gate
    score_function: str = "softmax"  # softmax | sigmoid
    # renormalise the top-k probabilities to sum to 1 (Qwen3-MoE: true; Qwen2-MoE: false, the
    # softmax over every expert, then the top k kept as they are). Sigmoid scores always are.
    norm_topk_prob: bool = True
    # aux_loss (Switch, per micro-batch) | seq_aux_loss (per sequence) | none; the coefficient
    # means the same in every sequence layout (`model/moe.py`)
    load_balancing: str = "aux_loss"
    aux_loss_coeff: float = 1e-3
    z_loss_coeff: float = 0.0  # ST-MoE router z-loss; 0: off
    # aux-loss-free balancing (DeepSeek-V3): a per-expert bias on the routing scores, moved
    # towards balance from each step's load (megatron-core updates it after the backward)
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    capacity_factor: Optional[float] = None  # None: dropless; else tokens over capacity drop
    grouped_gemm: Optional[bool] = None  # None: with Transformer Engine's layers (a GPU)
    # the first k layers keep a dense MLP (LLaDA-MoE, DeepSeek)
    first_dense_layers: int = weights(0)
    # per layer 1 (MoE) or 0 (dense); overrides the above
    pattern: Optional[List[int]] = weights(None)

    def _check(self):
        if self.num_experts is None:
            return
        need(self.num_experts >= 1, f"'model.moe.num_experts' must be >= 1, got "
             f"{self.num_experts}")
        need(self.top_k <= self.num_experts, f"'model.moe.top_k' = {self.top_k} exceeds "
             f"'model.moe.num_experts' = {self.num_experts}")
        need(self.shared_expert_size >= 0 and (self.shared_expert_size or
                                               not self.shared_expert_gate),
             "'model.moe.shared_expert_gate' needs 'model.moe.shared_expert_size' > 0")
        need(self.aux_loss_coeff >= 0 and self.z_loss_coeff >= 0,
             "'model.moe.aux_loss_coeff' and 'model.moe.z_loss_coeff' must be >= 0")
        need(self.capacity_factor is None or self.capacity_factor > 0,
             "'model.moe.capacity_factor' must be positive (or null: dropless)")
        need(self.pattern is None or set(self.pattern) <= {0, 1},
             f"'model.moe.pattern' = {self.pattern}: expected 0 (dense) or 1 (MoE) per layer")
        need(self.first_dense_layers >= 0, "'model.moe.first_dense_layers' must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.num_experts is not None


@dataclass
class ModelConfig(Section):
    NAME, POSITIVE = "model", ("num_layers", "hidden_size", "num_attention_heads")

    num_layers: int = weights(4)
    hidden_size: int = weights(256)
    num_attention_heads: int = weights(4)
    # None: multi-head attention; fewer: grouped-query
    num_query_groups: Optional[int] = weights(None)
    # None: SwiGLU default 8/3 * hidden, rounded up to 64
    ffn_hidden_size: Optional[int] = weights(None)
    vocab_size: Optional[int] = None  # None: taken from the tokenizer (plus padding)
    make_vocab_size_divisible_by: int = 128
    tie_embeddings: bool = weights(False)
    rotary_base: float = 10000.0
    rope_scaling: Optional[str] = None  # None | llama3 (Llama 3.1's long-context frequencies)
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    qkv_bias: bool = weights(False)  # Qwen2 has QKV biases; Llama has none
    qk_norm: bool = weights(False)  # RMSNorm of each query and key head before RoPE (Qwen3)
    kv_channels: Optional[int] = weights(None)  # the head dimension; None: hidden_size / heads
    init_std: float = 0.02
    attention_backend: str = "auto"  # auto | local | te  (te needs Transformer Engine and a GPU)
    attention_kernel: str = "auto"  # auto (flex on GPU, tiled on CPU) | tiled | flex | dense
    recompute: str = "none"  # none | full (keep each layer's input, recompute it in backward)
    # megatron-core's fused kernels where they exist: bias-SwiGLU (torch.compile) and
    # gradient-accumulation fusion (apex's CUDA extension); None: on a GPU
    fusions: Optional[bool] = None
    # the noise level of each row's block embedded and added to its embedding (SEDD's time
    # conditioning, `model/noise_level.py`); off: RADD's argument that the absorbing process
    # needs none
    time_conditioning: bool = weights(False)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def _check(self):
        self.moe.check()
        need(self.rope_scaling in (None, "llama3"),
             f"'model.rope_scaling' = {self.rope_scaling!r}; expected null or llama3")
        need(self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
             f"'model.num_attention_heads' = {self.num_attention_heads} does not divide "
             f"'model.hidden_size' = {self.hidden_size} (or set 'model.kv_channels')")
        need(self.kv_channels is None or self.kv_channels > 0,
             "'model.kv_channels' must be positive")
        need(self.num_query_groups is None or self.num_query_groups > 0,
             f"'model.num_query_groups' must be positive (null: one per head), got "
             f"{self.num_query_groups}")
        need(self.num_attention_heads % self.groups == 0,
             f"'model.num_query_groups' = {self.groups} does not divide "
             f"'model.num_attention_heads' = {self.num_attention_heads}")

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def moe_pattern(self) -> List[int]:
        """Per layer 1 (experts) or 0 (a dense MLP): `moe.pattern`, else all but the first
        `moe.first_dense_layers`; all 0 without `moe.num_experts`."""
        if not self.moe.enabled:
            return [0] * self.num_layers
        if self.moe.pattern is not None:
            return list(self.moe.pattern)
        return [int(i >= self.moe.first_dense_layers) for i in range(self.num_layers)]


@dataclass
class ScheduleSearchConfig(Section):
    """`diffusion.schedule_search`: BD3-LM's data-driven clipped schedule. Every `interval`
    training steps (0: off) the variance of the loss estimate is measured on `batches` held-out
    validation batches, `draws` noise draws each (`criterion`), for every [t_min, t_max] of
    `candidates`, and training switches to the range with the lowest
    (`train/callbacks/schedule_search.py`)."""

    NAME, POSITIVE = "diffusion.schedule_search", ("batches", "draws")

    interval: int = 0
    candidates: List[List[float]] = field(default_factory=lambda: [
        [0.0, 1.0], [0.1, 0.9], [0.2, 0.8], [0.3, 0.8], [0.45, 0.95]])
    batches: int = 8  # power: tests/test_schedule_search.py (2 x 4 picks the best in ~60 %)
    draws: int = 8
    # draws: the variance over `draws` noise draws of each batch's loss, averaged over the
    # batches (ours) | blocks: bd3lms' own, the variance over the per-block losses of one draw
    # per batch, summed over the batches (data and noise spread together)
    criterion: str = "draws"

    def _check(self):
        need(self.interval >= 0, f"'diffusion.schedule_search.interval' must be >= 0 (0: off), "
             f"got {self.interval}")
        need(self.criterion in ("draws", "blocks"), "'diffusion.schedule_search.criterion' must "
             f"be draws or blocks, got {self.criterion!r}")
        need(not self.interval or self.candidates, "'diffusion.schedule_search.candidates' is "
             "empty: give at least one [t_min, t_max] range to search")
        for c in self.candidates:
            need(isinstance(c, (list, tuple)) and len(c) == 2 and 0.0 <= c[0] < c[1] <= 1.0,
                 f"'diffusion.schedule_search.candidates': {c!r} is not a range [t_min, t_max] "
                 "with 0 <= t_min < t_max <= 1")


@dataclass
class DiffusionConfig(Section):
    NAME, POSITIVE = "diffusion", ("block_size",)

    # a registered objective (`config/objectives.py`): block_diffusion | ar | one of your own
    objective: str = "block_diffusion"
    block_size: int = 16
    shifted_prediction: bool = False
    # the diffusion loss: ce (the cross-entropy NELBO: MDLM / BD3-LM / RADD) | score_entropy
    # (SEDD's denoising score entropy with its absorbing parameterisation, `model/scores.py`)
    loss: str = "ce"
    # stratified: the n noise levels of a batch are systematic, (U + i) / n for one uniform U,
    # shuffled (an even spread, not antithetic pairs) | uniform: independent draws
    noise_sampling: str = "stratified"
    t_min: float = 0.0  # clipped noise range [t_min, t_max] (BD3-LM's [beta, omega]) for training
    t_max: float = 1.0
    # training and validation draw t above this floor (1/t weights near t = 0 have unbounded
    # variance; bd3lms, MDLM, dllm and SDAR floor at 1e-3): `objective.valid_range`
    t_floor: float = 1e-3
    views: int = 1  # noisy views of each sequence sharing one clean stream: [x_t^1..x_t^V ; x_0]
    complementary: bool = False  # views = 2, the second masks exactly what the first keeps
    # bd3lms' `training.resample`: training also clips each block's realised masked fraction
    # into the clipped range (t_min / t_max, or the schedule search's choice), not only t
    resample: bool = False
    # continued pretraining from an AR model (SDAR / Fast-dLLM v2 style):
    # an auxiliary next-token loss on one more stream, the clean sequence under a causal mask,
    # added to the NELBO with this weight (0: off; one extra L-row stream per sequence)
    ar_loss_weight: float = 0.0
    # how the clean stream x_0 attends to itself: block_causal (BD3-LM's: its block and the
    # earlier ones) or causal (token by token, an AR model; Nemotron-Labs-Diffusion's): the
    # next-token loss `ar_loss_weight` is then read from the clean stream itself (no extra
    # stream), whose K/V are an AR model's cache (speculative decoding, a converted AR model's
    # clean stream is that model exactly)
    clean_stream: str = "block_causal"
    # start step -> block size, e.g. {0: 4, 2000: 8}: small blocks first, then grow; the last
    # entry must equal `block_size` (the block size the model is decoded with). Empty: fixed B.
    # Block size 1 (with shifted prediction) is AR: {0: 1, 250: 16} starts the run as an AR model
    # and converts it to block diffusion in the same run (objective.at_step).
    block_size_schedule: Dict[int, int] = field(default_factory=dict)
    schedule_search: ScheduleSearchConfig = field(default_factory=ScheduleSearchConfig)

    def _check(self):
        self.schedule_search.check()
        search = self.schedule_search
        need(not search.interval or self.objective == "block_diffusion",
             "'diffusion.schedule_search' searches the noise range of block diffusion; "
             f"'diffusion.objective' = {self.objective} has no noise")
        need(not search.interval or not self.complementary or
             all(abs(lo + hi - 1.0) < 1e-12 for lo, hi in search.candidates),
             "'diffusion.complementary' needs symmetric ranges (t_min = 1 - t_max): "
             "'diffusion.schedule_search.candidates' has others")
        need(not search.interval or all(hi > self.t_floor for _, hi in search.candidates),
             f"'diffusion.schedule_search.candidates': every range must reach above "
             f"'diffusion.t_floor' = {self.t_floor}")
        need(0.0 <= self.t_min < self.t_max <= 1.0,
             f"'diffusion.t_min'/'diffusion.t_max' must satisfy 0 <= t_min < t_max <= 1, "
             f"got [{self.t_min}, {self.t_max}]")
        need(0.0 <= self.t_floor < self.t_max,
             f"'diffusion.t_floor' must be in [0, t_max), got {self.t_floor}")
        need(not self.complementary or abs(self.t_min + self.t_max - 1.0) < 1e-12,
             f"'diffusion.complementary' gives the second view the noise level 1 - t, which "
             f"leaves the clipped range [{self.t_min}, {self.t_max}]: clip symmetrically "
             "(t_min = 1 - t_max)")
        need(self.loss == "ce" or self.objective == "block_diffusion",
             f"'diffusion.loss' = {self.loss} is a diffusion loss; 'diffusion.objective' = "
             f"{self.objective} trains next-token prediction (use block_diffusion)")
        need(self.loss == "ce" or 1 not in self.block_size_schedule.values(),
             f"'diffusion.loss' = {self.loss} cannot train the AR phase (block size 1) of "
             "'diffusion.block_size_schedule'")
        need(not self.resample or self.objective == "block_diffusion",
             "'diffusion.resample' clips the masked fraction of block diffusion's blocks; "
             f"'diffusion.objective' = {self.objective} has no noise")
        if self.resample:
            ranges = [[self.t_min, self.t_max]] + (search.candidates if search.interval else [])
            for B in sorted({self.block_size, *self.block_size_schedule.values()} - {1}):
                for lo, hi in ranges:  # a count k with k / B in [lo, hi] (`noise.resample`)
                    need(math.ceil(lo * B - 1e-9) <= math.floor(hi * B + 1e-9),
                         f"'diffusion.resample': no masked count of a block of {B} has its "
                         f"fraction in [{lo}, {hi}]: widen the range or turn resample off")
        need(self.views >= 1, f"'diffusion.views' must be >= 1, got {self.views}")
        need(not self.complementary or self.views == 2,
             f"'diffusion.complementary' needs 'diffusion.views' = 2, got {self.views}")
        need(self.views == 1 or self.objective == "block_diffusion",
             "'diffusion.views' > 1 needs 'diffusion.objective' = block_diffusion")
        need(self.ar_loss_weight >= 0,
             f"'diffusion.ar_loss_weight' must be >= 0, got {self.ar_loss_weight}")
        need(self.ar_loss_weight == 0 or self.objective == "block_diffusion",
             "'diffusion.ar_loss_weight' is an auxiliary loss of block diffusion; the ar "
             "objective has the next-token loss already")
        need(self.clean_stream == "block_causal" or self.objective == "block_diffusion",
             f"'diffusion.clean_stream' = {self.clean_stream} is a layout of block diffusion; "
             f"'diffusion.objective' = {self.objective} has no clean stream")
        need(not self.block_size_schedule or self.objective == "block_diffusion",
             "'diffusion.block_size_schedule' needs 'diffusion.objective' = block_diffusion")


@dataclass
class DistillConfig(Section):
    NAME = "distill"

    # a frozen AR teacher (run directory or checkpoint, diffusion.objective = ar, same vocabulary):
    # for each masked position, KL(teacher's next-token distribution || the denoiser's prediction)
    # is added to the loss with `weight` per masked token; one extra no-gradient L-row forward
    teacher: Optional[str] = None
    weight: float = 1.0

    def _check(self):
        need(not self.teacher or self.weight > 0,
             f"'distill.weight' must be positive, got {self.weight}")


@dataclass
class ParallelConfig(Section):
    NAME, POSITIVE = "parallel", ("tensor", "pipeline", "context", "expert")

    tensor: int = 1
    pipeline: int = 1
    # expert parallel (model.moe): the experts split over `expert` ranks, each expert's FFN over
    # `expert_tensor` ranks (None: parallel.tensor), carved out of the tensor x context x data
    # ranks as megatron-core lays them out (expert_tensor x expert x expert-data = their product)
    expert: int = 1
    expert_tensor: Optional[int] = None
    virtual_pipeline: Optional[int] = None
    context: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    # process-group timeouts: megatron-core's groups (every training collective), and the world
    # group, which also waits while rank 0 builds the dataset and its sample index at start-up
    timeout_minutes: int = 10
    startup_timeout_minutes: int = 60
    # megatron-core DDP: the gradient reduce overlapped with the backward, the distributed
    # optimizer's parameter all-gather with the next forward; None: on a GPU (the latter with
    # the distributed optimizer)
    overlap_grad_reduce: Optional[bool] = None
    overlap_param_gather: Optional[bool] = None
    bucket_size: Optional[int] = None  # gradient bucket, elements; None: max(40M, 1M x DP)
    # tensor-parallel all-gather / reduce-scatter overlapped with the GEMMs (Transformer Engine's
    # userbuffers; needs sequence_parallel and the te attention backend on a GPU)
    tp_comm_overlap: bool = False

    def _check(self):
        need(not self.sequence_parallel or self.tensor > 1,
             "'parallel.sequence_parallel' needs 'parallel.tensor' > 1")
        need(self.timeout_minutes > 0 and self.startup_timeout_minutes >= self.timeout_minutes,
             "'parallel.timeout_minutes' must be positive and at most "
             "'parallel.startup_timeout_minutes'")
        need(not self.overlap_param_gather or self.distributed_optimizer,
             "'parallel.overlap_param_gather' needs 'parallel.distributed_optimizer'")
        need(not self.overlap_param_gather or self.overlap_grad_reduce is not False,
             "'parallel.overlap_param_gather' needs 'parallel.overlap_grad_reduce' (megatron-core "
             "overlaps the gather only together with the reduce)")
        need(self.bucket_size is None or self.bucket_size > 0,
             "'parallel.bucket_size' must be positive")
        need(not self.tp_comm_overlap or self.sequence_parallel,
             "'parallel.tp_comm_overlap' needs 'parallel.sequence_parallel' (and a GPU with "
             "Transformer Engine)")


@dataclass
class DataConfig(Section):
    NAME, POSITIVE = "data", ("seq_len",)

    # indexed-dataset prefix, builtin:shakespeare, or a blend "W1 PREFIX1 W2 PREFIX2 ..."
    path: str = "builtin:shakespeare"
    tokenizer: Optional[str] = None  # tokenizer.json; None: the one recorded beside the dataset
    seq_len: int = 256
    split: str = "95,5,0"
    cache_dir: Optional[str] = None  # megatron sample-index cache; None: beside the dataset
    # attention and the loss stay inside each document of a packed sequence (megatron packs
    # documents end to end; otherwise a block is denoised from an unrelated document's prefix)
    document_mask: bool = False
    backend: str = "megatron"  # megatron (memory-mapped reads in the step) | dali (extra [dali])

    def _check(self):
        try:
            weights = [float(w) for w in self.split.replace("/", ",").split(",")]
        except ValueError:
            weights = []
        need(1 <= len(weights) <= 3 and all(w >= 0 for w in weights) and sum(weights) > 0,
             f"'data.split' = {self.split!r}: expected up to three non-negative weights of the "
             "train, validation and test splits, e.g. 95,5,0")


@dataclass
class OptimizerConfig(Section):
    NAME, POSITIVE = "optimizer", ("lr", "eps")

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 50
    decay_style: str = "cosine"  # cosine | linear | constant

    def _check(self):
        need(self.min_lr <= self.lr,
             f"'optimizer.min_lr' = {self.min_lr} exceeds 'optimizer.lr' = {self.lr}")
        need(self.min_lr >= 0 and self.weight_decay >= 0 and self.clip_grad >= 0
             and self.warmup_steps >= 0, "'optimizer.min_lr', 'optimizer.weight_decay', "
             "'optimizer.clip_grad' and 'optimizer.warmup_steps' must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
             f"'optimizer.beta1' = {self.beta1} and 'optimizer.beta2' = {self.beta2} must be "
             "in [0, 1)")


@dataclass
class TrainConfig(Section):
    NAME = "train"
    POSITIVE = ("steps", "micro_batch_size", "global_batch_size", "log_interval")

    steps: int = 600
    micro_batch_size: int = 8
    global_batch_size: int = 16
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    # FP8 GEMMs through Transformer Engine on a GPU (checked where the job runs, not where it is
    # submitted); decoding and the samples logged during training run without FP8
    fp8: Optional[str] = None  # None | e4m3 | hybrid
    fp8_recipe: str = "delayed"  # delayed (amax history) | tensorwise (current scaling)
    fp8_margin: int = 0  # scaling-factor margin (powers of 2)
    fp8_amax_history_len: int = 1024  # delayed scaling: amax history per tensor
    fp8_amax_compute_algo: str = "max"  # delayed scaling: max | most_recent of the history
    # the first and the last layers of the model kept in BF16 (tensorwise only; megatron-core's
    # first_last_layers_bf16; at most the layers of one pipeline stage)
    fp8_bf16_first_layers: int = 0
    fp8_bf16_last_layers: int = 0
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    resume: str = "auto"  # auto (latest complete checkpoint in run_dir) | none | a checkpoint path
    # a run directory or checkpoint whose model weights start this run at step 0 with a fresh
    # optimizer (e.g. a converted AR model, `cascade convert`); unused once the run has its own
    init_from: Optional[str] = None
    threads: Optional[int] = None  # torch intra-op threads on CPU; None: torch's default
    exit_interval: Optional[int] = None  # checkpoint and stop after this many steps of this job
    # a step whose gradients are NaN / Inf (a non-finite loss) is never applied; then: stop (one
    # message naming the step and the last good checkpoint) or skip (warn, go on with the next)
    nonfinite: str = "stop"
    # the torch profiler over steps START+1 .. STOP: one trace per rank in <run_dir>/profile/
    profile: Optional[List[int]] = None
    heartbeat_s: float = 10.0  # how often each rank rewrites <run_dir>/heartbeat/rank<R>.json
    # `--nproc-per-node`: how long the launcher, signalled, waits for its ranks' checkpoint-and-
    # stop before it kills them (`launchers/torchrun.py`)
    stop_grace_s: float = 600.0

    def _check(self):
        need(self.profile is None or (len(self.profile) == 2 and
                                      0 <= self.profile[0] < self.profile[1] <= self.steps),
             f"'train.profile' = {self.profile}: expected [START, STOP] with 0 <= START < STOP "
             f"<= 'train.steps' = {self.steps}")
        need(self.heartbeat_s > 0, "'train.heartbeat_s' must be positive")
        need(self.stop_grace_s > 0, "'train.stop_grace_s' must be positive (seconds)")
        need(self.exit_interval is None or self.exit_interval >= 1,
             f"'train.exit_interval' must be >= 1 (null: never), got {self.exit_interval}")
        need(self.fp8 in (None, "e4m3", "hybrid"),
             f"'train.fp8' = {self.fp8!r}; expected e4m3 or hybrid")
        bf16_layers = self.fp8_bf16_first_layers, self.fp8_bf16_last_layers
        need(not any(bf16_layers) or self.fp8_recipe != "delayed",
             "'train.fp8_bf16_first_layers' / 'train.fp8_bf16_last_layers' need "
             "'train.fp8_recipe' = tensorwise (delayed scaling keeps every layer in FP8)")
        need(self.fp8_margin >= 0 and self.fp8_amax_history_len >= 1,
             "'train.fp8_margin' must be >= 0 and 'train.fp8_amax_history_len' >= 1")
        need(self.eval_interval >= 0 and self.eval_batches >= 0,
             "'train.eval_interval' and 'train.eval_batches' must be >= 0")


@dataclass
class CheckpointConfig(Section):
    NAME, POSITIVE = "checkpoint", ("interval",)

    interval: int = 200
    keep_last: Optional[int] = None  # None keeps every checkpoint
    # a damaged checkpoint at resume: the newest older one that verifies (with a warning), or stop
    on_corrupt: str = "fallback"

    def _check(self):
        need(self.keep_last is None or self.keep_last >= 1,
             f"'checkpoint.keep_last' must be >= 1 (null keeps every checkpoint), got "
             f"{self.keep_last}")


@dataclass
class TrackingConfig(Section):
    NAME = "tracking"

    enabled: bool = True
    uri: Optional[str] = None  # None: sqlite store in the run directory; or http(s)://HOST:PORT
    experiment: str = "cascade"
    run_name: Optional[str] = None  # None: the config's `name`
    tags: Dict[str, str] = field(default_factory=dict)
    group: Optional[str] = None  # runs of one sweep share it (tag cascade.group)
    parent_run_id: Optional[str] = None  # nest under a parent run (the MLflow UI groups them)
    samples: int = 2  # generations logged at each evaluation (one-stage layouts); 0: none
    sample_tokens: int = 32
    max_buffer: int = 100_000  # metrics held while the store does not answer
    flush_timeout: float = 30.0  # seconds the end of a run waits for the store to take the rest

    def _check(self):
        need(self.max_buffer > 0, "'tracking.max_buffer' must be positive")
        need(self.samples >= 0 and self.sample_tokens > 0,
             "'tracking.samples' must be >= 0 and 'tracking.sample_tokens' > 0")


@dataclass
class CascadeConfig:
    name: str = "run"
    run_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # modules imported before the config is checked: an objective of your own registers itself
    # in one (`config/objectives.py`); they must be importable where the run starts
    imports: List[str] = field(default_factory=list)


PRECISIONS = ("auto", "fp32", "bf16")
# the overrides that put a run's config on one process (decoding, benchmarks side by side)
ONE_PROCESS = [f"parallel.{k}=1" for k in ("tensor", "pipeline", "context", "expert")] + \
    ["parallel.sequence_parallel=false", "parallel.virtual_pipeline=null",
     "parallel.expert_tensor=null"]
_CHOICES = {
    "diffusion.noise_sampling": ("stratified", "uniform"),
    "diffusion.loss": ("ce", "score_entropy"),
    "optimizer.decay_style": ("cosine", "linear", "constant"),
    "diffusion.clean_stream": ("block_causal", "causal"),
    "train.precision": PRECISIONS,
    "model.attention_backend": ("auto", "local", "te"),
    "model.attention_kernel": ("auto", "tiled", "flex", "dense"),
    "model.recompute": ("none", "full"),
    "model.moe.score_function": ("softmax", "sigmoid"),
    "model.moe.load_balancing": ("aux_loss", "seq_aux_loss", "none"),
    "data.backend": ("megatron", "dali"),
    "train.fp8_recipe": ("delayed", "tensorwise"),
    "train.fp8_amax_compute_algo": ("max", "most_recent"),
    "train.nonfinite": ("stop", "skip"),
    "checkpoint.on_corrupt": ("fallback", "stop"),
}
