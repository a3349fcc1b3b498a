"""Typed run configuration: dataclasses, YAML files that build on a base, dotted overrides.

A config file may name a `base:` file (relative to itself); the chain is merged base-first, then the
command-line overrides (`model.num_layers=4`). Unknown keys, wrong types and impossible combinations
raise `ConfigError` with one message naming the key, before anything expensive is built.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration the run cannot use; the message names the offending key."""


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention; fewer: grouped-query
    ffn_hidden_size: Optional[int] = None  # None: SwiGLU default 8/3 * hidden, rounded up to 64
    vocab_size: Optional[int] = None  # None: taken from the tokenizer (plus padding)
    make_vocab_size_divisible_by: int = 128
    tie_embeddings: bool = False
    rotary_base: float = 10000.0
    rope_scaling: Optional[str] = None  # None | llama3 (Llama 3.1's long-context frequencies)
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    qkv_bias: bool = False  # Qwen2 has QKV biases; Llama has none
    init_std: float = 0.02
    attention_backend: str = "auto"  # auto | local | te  (te needs Transformer Engine and a GPU)
    attention_kernel: str = "auto"  # auto (flex on GPU, tiled on CPU) | tiled | flex | dense
    recompute: str = "none"  # none | full (keep each layer's input, recompute it in backward)


@dataclass
class DiffusionConfig:
    objective: str = "block_diffusion"  # block_diffusion | ar
    block_size: int = 16
    shifted_prediction: bool = False
    noise_sampling: str = "stratified"  # stratified (antithetic across the batch) | uniform
    t_min: float = 0.0  # clipped noise range [t_min, t_max] (BD3-LM's [beta, omega]) for training
    t_max: float = 1.0
    views: int = 1  # noisy views of each sequence sharing one clean stream: [x_t^1..x_t^V ; x_0]
    complementary: bool = False  # views = 2, the second masks exactly what the first keeps
    # continued pretraining from an AR model (SDAR / Fast-dLLM v2 style):
    # an auxiliary next-token loss on one more stream, the clean sequence under a causal mask,
    # added to the NELBO with this weight (0: off; one extra L-row stream per sequence)
    ar_loss_weight: float = 0.0
    # start step -> block size, e.g. {0: 4, 2000: 8}: small blocks first, then grow; the last
    # entry must equal `block_size` (the block size the model is decoded with). Empty: fixed B.
    # Block size 1 (with shifted prediction) is AR: {0: 1, 250: 16} starts the run as an AR model
    # and converts it to block diffusion in the same run (objective.at_step).
    block_size_schedule: Dict[int, int] = field(default_factory=dict)


@dataclass
class DistillConfig:
    # a frozen AR teacher (run directory or checkpoint, diffusion.objective = ar, same vocabulary):
    # for each masked position, KL(teacher's next-token distribution || the denoiser's prediction)
    # is added to the loss with `weight` per masked token; one extra no-gradient L-row forward
    teacher: Optional[str] = None
    weight: float = 1.0


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    context: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False


@dataclass
class DataConfig:
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


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 50
    decay_style: str = "cosine"  # cosine | linear | constant


@dataclass
class TrainConfig:
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


@dataclass
class CheckpointConfig:
    interval: int = 200
    keep_last: Optional[int] = None  # None keeps every checkpoint


@dataclass
class TrackingConfig:
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

    @property
    def attention_kind(self) -> str:
        """The sequence layout the objective lays out, decided here once (the `AttentionLayout`
        kinds): 'causal' (the AR objective), 'full' (B = L: masked diffusion over the whole
        sequence, no clean stream) or 'block_diffusion' (B < L: noisy views and a clean stream)."""
        d = self.diffusion
        if d.objective == "ar":
            return "causal"
        return "full" if d.block_size >= self.data.seq_len else "block_diffusion"


PRECISIONS = ("auto", "fp32", "bf16")
_CHOICES = {
    "diffusion.objective": ("block_diffusion", "ar"),
    "diffusion.noise_sampling": ("stratified", "uniform"),
    "optimizer.decay_style": ("cosine", "linear", "constant"),
    "train.precision": PRECISIONS,
    "model.attention_backend": ("auto", "local", "te"),
    "model.attention_kernel": ("auto", "tiled", "flex", "dense"),
    "model.recompute": ("none", "full"),
    "data.backend": ("megatron", "dali"),
    "train.fp8_recipe": ("delayed", "tensorwise"),
    "train.fp8_amax_compute_algo": ("max", "most_recent"),
}


def _yaml_chain(path: str) -> List[dict]:
    """The YAML file and its `base:` ancestors, base first."""
    chain, seen = [], set()
    while path:
        path = os.path.abspath(path)
        if path in seen:
            raise ConfigError(f"config {path}: `base:` chain loops back to itself")
        seen.add(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        node = OmegaConf.load(path)
        base = node.pop("base", None)
        chain.append(node)
        path = os.path.join(os.path.dirname(path), base) if base else None
    return chain[::-1]


def _suggest(key: str) -> str:
    *parents, leaf = key.split(".")
    node = OmegaConf.structured(CascadeConfig)
    for p in parents:
        node = node.get(p) if p in node else None
        if node is None:
            return ""
    close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
    return f" (did you mean '{'.'.join(parents + close)}'?)" if close else ""


def _explain(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"{origin}: unknown config key '{key}'{_suggest(key)}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"{origin}: wrong type for '{key}': {msg}")
    return ConfigError(f"{origin}: {str(err).splitlines()[0]}")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                world_size: Optional[int] = None) -> CascadeConfig:
    """Merge defaults <- YAML chain <- overrides, validate, and return a typed config object.

    world_size: the number of processes the run will have (default: the launcher's environment;
    0: not known here, the layout is checked against no world size).
    """
    cfg = OmegaConf.structured(CascadeConfig)
    for node in _yaml_chain(path) if path else []:
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as err:
            raise _explain(err, path) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from None
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise ConfigError("'run_dir' is not set (set it in the YAML file or as run_dir=PATH)")
    obj: CascadeConfig = OmegaConf.to_object(cfg)
    if world_size is None:
        from cascade_mega.runtime.env import read_env

        world_size = read_env().world_size
    validate(obj, world_size)
    return obj


def validate(cfg: CascadeConfig, world_size: int = 1) -> None:
    """Reject impossible combinations with one message naming the keys involved."""

    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    for key, choices in _CHOICES.items():
        section, leaf = key.split(".")
        value = getattr(getattr(cfg, section), leaf)
        need(value in choices, f"'{key}' = {value!r}; expected one of {', '.join(choices)}")
    m, d, p, t, o = cfg.model, cfg.diffusion, cfg.parallel, cfg.train, cfg.optimizer
    L = cfg.data.seq_len
    for key, value in [("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                       ("model.num_attention_heads", m.num_attention_heads),
                       ("data.seq_len", L), ("diffusion.block_size", d.block_size),
                       ("train.steps", t.steps), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.global_batch_size", t.global_batch_size),
                       ("train.log_interval", t.log_interval),
                       ("checkpoint.interval", cfg.checkpoint.interval),
                       ("parallel.tensor", p.tensor), ("parallel.pipeline", p.pipeline),
                       ("parallel.context", p.context)]:
        need(value > 0, f"'{key}' must be positive, got {value}")
    if d.objective == "block_diffusion":
        need(L % d.block_size == 0, f"'diffusion.block_size' = {d.block_size} does not divide "
             f"'data.seq_len' = {L}")
    _validate_continued(cfg, need)
    need(0.0 <= d.t_min < d.t_max <= 1.0,
         f"'diffusion.t_min'/'diffusion.t_max' must satisfy 0 <= t_min < t_max <= 1, "
         f"got [{d.t_min}, {d.t_max}]")
    need(m.rope_scaling in (None, "llama3"),
         f"'model.rope_scaling' = {m.rope_scaling!r}; expected null or llama3")
    need(m.hidden_size % m.num_attention_heads == 0,
         f"'model.num_attention_heads' = {m.num_attention_heads} does not divide "
         f"'model.hidden_size' = {m.hidden_size}")
    groups = m.num_query_groups or m.num_attention_heads
    need(m.num_attention_heads % groups == 0,
         f"'model.num_query_groups' = {groups} does not divide 'model.num_attention_heads' = "
         f"{m.num_attention_heads}")
    need(m.num_attention_heads % p.tensor == 0,
         f"'parallel.tensor' = {p.tensor} does not divide 'model.num_attention_heads' = "
         f"{m.num_attention_heads}")
    need(groups % p.tensor == 0,
         f"'parallel.tensor' = {p.tensor} does not divide 'model.num_query_groups' = {groups}")
    need(m.vocab_size is None or m.vocab_size % p.tensor == 0,
         f"'parallel.tensor' = {p.tensor} does not divide 'model.vocab_size' = {m.vocab_size}")
    need(m.num_layers % p.pipeline == 0,
         f"'parallel.pipeline' = {p.pipeline} does not divide 'model.num_layers' = {m.num_layers}")
    need(not p.sequence_parallel or p.tensor > 1,
         "'parallel.sequence_parallel' needs 'parallel.tensor' > 1")
    if p.context > 1:
        B = 1 if d.objective == "ar" else d.block_size
        need(cfg.attention_kind != "full", "'parallel.context' > 1 needs 'diffusion.block_size' < "
             "'data.seq_len' (full-sequence diffusion attends across the whole sequence)")
        need(L % (2 * p.context * B) == 0,
             f"'parallel.context' = {p.context} cuts 'data.seq_len' = {L} into 2 x {p.context} "
             f"chunks of whole blocks: seq_len must be a multiple of 2 x context x block size = "
             f"{2 * p.context * B}")
        need(m.attention_kernel in ("auto", "tiled"), f"'parallel.context' > 1 runs the tiled "
             f"attention kernel; 'model.attention_kernel' = {m.attention_kernel} has no "
             "context-parallel path")
    if p.sequence_parallel:
        streams = 1 if d.objective == "ar" else \
            d.views + (cfg.attention_kind == "block_diffusion") + (d.ar_loss_weight > 0)
        rows = streams * L // p.context
        need(rows % p.tensor == 0, f"'parallel.sequence_parallel' splits this rank's {rows} "
             f"sequence rows across 'parallel.tensor' = {p.tensor} ranks: they must divide evenly")
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size == 0:  # e.g. reading a finished sweep back: whatever world it ran at
        world_size = model_parallel * t.global_batch_size // t.micro_batch_size
    need(world_size % model_parallel == 0,
         f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x "
         f"parallel.context = {model_parallel}")
    dp = world_size // model_parallel
    need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
         f"'train.global_batch_size' = {t.global_batch_size} is not a multiple of "
         f"'train.micro_batch_size' x data-parallel size = {t.micro_batch_size} x {dp}")
    need(0 <= o.warmup_steps < t.steps, f"'optimizer.warmup_steps' = {o.warmup_steps} must be "
         f"smaller than 'train.steps' = {t.steps}")
    need(d.views >= 1, f"'diffusion.views' must be >= 1, got {d.views}")
    need(not d.complementary or d.views == 2,
         f"'diffusion.complementary' needs 'diffusion.views' = 2, got {d.views}")
    need(d.views == 1 or d.objective == "block_diffusion",
         "'diffusion.views' > 1 needs 'diffusion.objective' = block_diffusion")
    need(t.fp8 in (None, "e4m3", "hybrid"), f"'train.fp8' = {t.fp8!r}; expected e4m3 or hybrid")
    bf16_layers = t.fp8_bf16_first_layers, t.fp8_bf16_last_layers
    need(min(bf16_layers) >= 0 and max(bf16_layers) <= m.num_layers // p.pipeline,
         f"'train.fp8_bf16_first_layers' / 'train.fp8_bf16_last_layers' = {bf16_layers} must be "
         f"between 0 and the layers of a pipeline stage ({m.num_layers // p.pipeline})")
    need(not any(bf16_layers) or t.fp8_recipe != "delayed",
         "'train.fp8_bf16_first_layers' / 'train.fp8_bf16_last_layers' need "
         "'train.fp8_recipe' = tensorwise (delayed scaling keeps every layer in FP8)")
    need(t.fp8_margin >= 0 and t.fp8_amax_history_len >= 1,
         "'train.fp8_margin' must be >= 0 and 'train.fp8_amax_history_len' >= 1")
    need(o.min_lr <= o.lr, f"'optimizer.min_lr' = {o.min_lr} exceeds 'optimizer.lr' = {o.lr}")
    need(cfg.tracking.max_buffer > 0, "'tracking.max_buffer' must be positive")
    need(cfg.tracking.samples >= 0 and cfg.tracking.sample_tokens > 0,
         "'tracking.samples' must be >= 0 and 'tracking.sample_tokens' > 0")
    need(t.eval_interval >= 0 and t.eval_batches >= 0,
         "'train.eval_interval' and 'train.eval_batches' must be >= 0")


def _validate_continued(cfg: CascadeConfig, need) -> None:
    """The auxiliary AR loss, the block-size schedule and distillation."""
    d, p, L = cfg.diffusion, cfg.parallel, cfg.data.seq_len
    diffusion = d.objective == "block_diffusion"
    need(d.ar_loss_weight >= 0, f"'diffusion.ar_loss_weight' must be >= 0, got {d.ar_loss_weight}")
    need(d.ar_loss_weight == 0 or diffusion,
         "'diffusion.ar_loss_weight' is an auxiliary loss of block diffusion; the ar objective "
         "has the next-token loss already")
    need(d.ar_loss_weight == 0 or p.context == 1,
         "'diffusion.ar_loss_weight' has no context-parallel path: use 'parallel.context' = 1")
    schedule = d.block_size_schedule
    if schedule:
        need(diffusion, "'diffusion.block_size_schedule' needs 'diffusion.objective' = "
             "block_diffusion")
        steps = sorted(schedule)
        need(steps[0] == 0, f"'diffusion.block_size_schedule' must start at step 0, got "
             f"{steps[0]}")
        need(steps[-1] < cfg.train.steps, f"'diffusion.block_size_schedule' starts block size "
             f"{schedule[steps[-1]]} at step {steps[-1]}, not before 'train.steps' = "
             f"{cfg.train.steps}")
        need(schedule[steps[-1]] == d.block_size, f"'diffusion.block_size_schedule' ends at "
             f"block size {schedule[steps[-1]]}; it must end at 'diffusion.block_size' = "
             f"{d.block_size} (the block size the model is decoded with)")
        need(1 not in schedule.values() or d.shifted_prediction,
             "'diffusion.block_size_schedule' block size 1 is an AR phase: it needs "
             "'diffusion.shifted_prediction' = true (row i-1 predicts token i, as in AR)")
        need(1 not in schedule.values() or not cfg.distill.teacher,
             "'diffusion.block_size_schedule' block size 1 (an AR phase) cannot be distilled "
             "from 'distill.teacher' (the teacher is that AR model's kind already)")
        for step, B in schedule.items():
            need(B > 0 and L % B == 0, f"'diffusion.block_size_schedule' block size {B} (from "
                 f"step {step}) does not divide 'data.seq_len' = {L}")
            need((B < L) == (d.block_size < L), "'diffusion.block_size_schedule' mixes B = L "
                 "with B < L (they lay out a different number of rows)")
            need(p.context == 1 or L % (2 * p.context * B) == 0,
                 f"'diffusion.block_size_schedule' block size {B} does not fit the "
                 f"context-parallel chunks (seq_len a multiple of 2 x context x B)")
    t = cfg.distill
    if t.teacher:
        need(diffusion, "'distill.teacher' distils an AR teacher into a block-diffusion model: "
             "'diffusion.objective' must be block_diffusion")
        need(t.weight > 0, f"'distill.weight' must be positive, got {t.weight}")
        need(not (p.sequence_parallel and p.pipeline > 1) or L % p.tensor == 0,
             f"'distill.teacher' under pipeline and sequence parallel splits the teacher's {L} "
             f"rows across 'parallel.tensor' = {p.tensor} ranks: they must divide evenly")
        need(p.context == 1, "'distill.teacher' has no context-parallel path (a target's teacher "
             "row can sit on another rank): use 'parallel.context' = 1")
        need(not p.virtual_pipeline, "'distill.teacher' has no interleaved-pipeline path: unset "
             "'parallel.virtual_pipeline'")


def run_dtype(cfg: CascadeConfig):
    """The torch dtype of `train.precision` on this process's device (auto: bf16 on a GPU)."""
    import torch

    from cascade_mega.runtime import device

    precision = cfg.train.precision
    if precision == "bf16" or (precision == "auto" and device.on_gpu()):
        return torch.bfloat16
    return torch.float32


def to_yaml(cfg: CascadeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
