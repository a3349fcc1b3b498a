"""`cascade plan`: memory per GPU of a parallel layout, before anything is launched.

The layout is first checked by the same `validate` as `cascade train` (an impossible layout is
refused with the same message). Then, per GPU of the first pipeline stage (which holds the most
micro-batches in flight) and of the last stage (which holds the logits):

- parameters: counted from the architecture (embedding, QKV / output projections, SwiGLU MLP,
  RMSNorms, output layer), split by tensor and pipeline parallel as megatron-core splits them.
- gradients: megatron-core DDP's fp32 main-gradient buffer, 4 bytes per parameter.
- optimizer: Adam's two fp32 moments plus an fp32 master copy under bf16, sharded across DP x CP
  with the distributed optimizer. With the parameters and gradients this is megatron-core's
  documented table (bytes per parameter): bf16 18, or 6 + 12/d distributed; fp32 16, or 8 + 8/d.
- activations: the tensors a layer of the local spec saves for backward, per micro-batch (rows S
  held by this rank, micro-batch b, hidden h, FFN f, heads a, query groups g, head dim d, tensor
  parallel t; e = 2 bytes in bf16, 4 in fp32; under sequence parallel the norm region is /t):
      two RMSNorms   2 x (3 S b h e + 4 S b)   (input, normalised input, output)
      attention      (S b h + 2 S b g d + S b h + S b h) e / t + 4 S b a / t  (q, k, v, output,
                     output-projection input, log-sum-exp) + RoPE tables 16 S d
      SwiGLU MLP     5 S b f e / t             (fc1 output (2f), silu, product)
      context par.   + 2 L b g d e / t         (the gathered clean stream's K and V)
  times the layer-micro-batches in flight (1F1B: min(PP, micro-batches) on the first stage;
  interleaved: L (1 + (PP - 1) / (PP V)), Korthikanti et al. 2022), plus on the last stage the
  final norm, the read-out rows' hidden states and their fp32 logits (n b V / t x 4).
  Full recompute (`model.recompute=full`) keeps each layer's input (S b h e, / t under sequence
  parallel) and one layer's activations while it is recomputed.

Headroom on top, per GPU: the CUDA context with cuBLAS / cuDNN workspaces and the allocator's
reserve (1 GiB), and NCCL's buffers, 0.25 GiB for each process group of more than one rank
(tensor, pipeline, context, data parallel). A refused layout is answered with the single changes
that would make it fit, in the order that costs least: the distributed optimizer, sequence
parallelism, full recompute, half the micro-batch, twice the pipeline or tensor ranks.

The estimate is checked against memory measured on CPU for small models (tests/test_plan.py) and
against the published figures above. It counts what the model holds, not allocator fragmentation;
the TE spec on GPU fuses some of these tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

from cascade_mega.config import CascadeConfig, ConfigError, validate

GiB = 1024 ** 3
CONTEXT_BYTES = GiB  # CUDA context, cuBLAS / cuDNN workspaces, the allocator's reserve
NCCL_BYTES_PER_GROUP = GiB // 4  # NCCL's buffers for each group of more than one rank


@dataclass
class StagePlan:
    stage: str
    parameters: int  # elements on one GPU of this stage
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # no recompute
    activation_bytes_recompute: int  # full recompute

    def total(self, recompute: bool) -> int:
        act = self.activation_bytes_recompute if recompute else self.activation_bytes
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + act


@dataclass
class Plan:
    gpus: int
    tensor: int
    pipeline: int
    context: int
    data: int
    precision: str
    recompute: bool
    stages: list
    headroom_bytes: int = 0  # CUDA context and communication buffers, per GPU

    def peak(self) -> int:
        return max(s.total(self.recompute) for s in self.stages) + self.headroom_bytes


def model_dims(cfg: CascadeConfig, vocab: int) -> dict:
    """h, a (heads), g (query groups), d (head dim), f (FFN), V (padded vocabulary, per the
    tensor-parallel size)."""
    from cascade_mega.model.gpt import ffn_size, vocab_rows

    m = cfg.model
    return dict(h=m.hidden_size, a=m.num_attention_heads, g=m.num_query_groups or
                m.num_attention_heads, d=m.kv_channels or m.hidden_size // m.num_attention_heads,
                f=ffn_size(cfg), V=vocab_rows(cfg, vocab))


def layer_parameters(cfg: CascadeConfig, vocab: int) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank."""
    x, t = model_dims(cfg, vocab), cfg.parallel.tensor
    qkv = (x["a"] + 2 * x["g"]) * x["d"]
    return ((x["h"] + int(cfg.model.qkv_bias)) * qkv + x["a"] * x["d"] * x["h"] +
            3 * x["f"] * x["h"]) // t + 2 * x["h"]


def stage_parameters(cfg: CascadeConfig, vocab: int, first: bool, last: bool) -> int:
    x, p = model_dims(cfg, vocab), cfg.parallel
    n = cfg.model.num_layers // p.pipeline * layer_parameters(cfg, vocab)
    table = x["V"] * x["h"] // p.tensor
    if first:
        n += table
    if last:  # final norm and output layer (a tied output layer is a copy on another stage)
        n += x["h"] + (0 if cfg.model.tie_embeddings and first else table)
    return n


def layer_activation_bytes(cfg: CascadeConfig, vocab: int, e: int) -> tuple[int, int]:
    """(saved bytes of one layer, one micro-batch; bytes kept under full recompute)."""
    from cascade_mega.diffusion.objective import sequence_rows

    x, p, b = model_dims(cfg, vocab), cfg.parallel, cfg.train.micro_batch_size
    t = p.tensor
    S = sequence_rows(cfg) // p.context
    sp = t if p.sequence_parallel else 1
    h, g, d, f, a = x["h"], x["g"], x["d"], x["f"], x["a"]
    norms = 2 * (3 * S * b * h * e + 4 * S * b) // sp
    attention = (3 * S * b * h + 2 * S * b * g * d) * e // t + 4 * S * b * a // t + 16 * S * d
    if p.context > 1:
        attention += 2 * cfg.data.seq_len * b * g * d * e // t
    mlp = 5 * S * b * f * e // t
    return norms + attention + mlp, S * b * h * e // sp


def head_activation_bytes(cfg: CascadeConfig, vocab: int, e: int) -> int:
    """Last stage: final norm, read-out hidden states, fp32 logits (per micro-batch)."""
    from cascade_mega.diffusion.objective import readout_rows, sequence_rows

    x, p, b = model_dims(cfg, vocab), cfg.parallel, cfg.train.micro_batch_size
    S = sequence_rows(cfg) // p.context
    sp = p.tensor if p.sequence_parallel else 1
    n = readout_rows(cfg) // p.context
    return (2 * S * b * x["h"] * e + 4 * S * b) // sp + n * b * x["h"] * e + \
        n * b * x["V"] // p.tensor * 4


def plan(cfg: CascadeConfig, gpus: int, vocab: int) -> Plan:
    validate(cfg, gpus)
    if cfg.model.moe.enabled:  # an estimate without the experts would be silently wrong
        raise ConfigError("cascade plan does not count mixture-of-experts layers "
                          "('model.moe') yet: it would report the dense model's memory")
    p, t = cfg.parallel, cfg.train
    bf16 = t.precision != "fp32"  # "auto" is bf16 on the GPUs this plans for
    e = 2 if bf16 else 4
    dp = gpus // (p.tensor * p.pipeline * p.context)
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    per_layer, kept = layer_activation_bytes(cfg, vocab, e)
    layers = cfg.model.num_layers // p.pipeline
    if p.pipeline == 1:
        in_flight = layers
    elif p.virtual_pipeline:
        in_flight = math.ceil(cfg.model.num_layers *
                              (1 + (p.pipeline - 1) / (p.pipeline * p.virtual_pipeline)))
    else:
        in_flight = layers * min(p.pipeline, micro)
    head = head_activation_bytes(cfg, vocab, e)
    from cascade_mega.diffusion.objective import sequence_rows

    ids = 8 * t.micro_batch_size * sequence_rows(cfg) // p.context  # token ids the embedding keeps
    stages = []
    names = [("first", True, p.pipeline == 1)] + ([("last", False, True)] if p.pipeline > 1
                                                    else [])
    for name, first, last in names:
        n = stage_parameters(cfg, vocab, first, last)
        shard = dp * p.context if p.distributed_optimizer else 1
        flight = in_flight if first else layers
        extra = (head if last else 0) + (ids * min(p.pipeline, micro) if first else 0)
        stages.append(StagePlan(
            stage=name if p.pipeline > 1 else "only",
            parameters=n, parameter_bytes=n * e, gradient_bytes=n * 4,
            optimizer_bytes=n * (8 + (4 if bf16 else 0)) // shard,
            activation_bytes=flight * per_layer + extra,
            activation_bytes_recompute=flight * kept + per_layer + extra))
    groups = sum(size > 1 for size in (p.tensor, p.pipeline, p.context, dp))
    return Plan(gpus=gpus, tensor=p.tensor, pipeline=p.pipeline, context=p.context, data=dp,
                precision="bf16" if bf16 else "fp32", recompute=cfg.model.recompute == "full",
                stages=stages, headroom_bytes=CONTEXT_BYTES + groups * NCCL_BYTES_PER_GROUP)


def _changes(cfg: CascadeConfig):
    """(override, config) of each single change that lowers memory, cheapest first."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    if not p.distributed_optimizer:
        yield "parallel.distributed_optimizer=true", replace(
            cfg, parallel=replace(p, distributed_optimizer=True))
    if p.tensor > 1 and not p.sequence_parallel:
        yield "parallel.sequence_parallel=true", replace(
            cfg, parallel=replace(p, sequence_parallel=True))
    if m.recompute != "full":
        yield "model.recompute=full", replace(cfg, model=replace(m, recompute="full"))
    if t.micro_batch_size > 1:
        yield f"train.micro_batch_size={t.micro_batch_size // 2}", replace(
            cfg, train=replace(t, micro_batch_size=t.micro_batch_size // 2))
    yield f"parallel.pipeline={2 * p.pipeline}", replace(
        cfg, parallel=replace(p, pipeline=2 * p.pipeline, virtual_pipeline=None))
    yield f"parallel.tensor={2 * p.tensor}", replace(cfg, parallel=replace(p, tensor=2 * p.tensor))


def what_fits(cfg: CascadeConfig, gpus: int, vocab: int, limit: int) -> list:
    """'override (X GiB)' of each single change after which the layout fits in `limit` bytes."""
    out = []
    for override, changed in _changes(cfg):
        try:
            need = plan(changed, gpus, vocab).peak()
        except ConfigError:  # the change makes an impossible layout (heads, layers, batch)
            continue
        if need <= limit:
            out.append(f"{override} ({need / GiB:.1f} GiB)")
    return out


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f} GiB"


def render(pl: Plan) -> str:
    lines = [f"layout: TP={pl.tensor} PP={pl.pipeline} CP={pl.context} DP={pl.data} on "
             f"{pl.gpus} GPUs, {pl.precision}"]
    for s in pl.stages:
        lines += [f"per GPU of the {s.stage} stage:" if s.stage != "only" else "per GPU:",
                  f"  parameters      {s.parameters / 1e9:8.3f} B  {_gib(s.parameter_bytes)}",
                  f"  gradients                   {_gib(s.gradient_bytes)}",
                  f"  optimizer state             {_gib(s.optimizer_bytes)}",
                  f"  activations                 {_gib(s.activation_bytes)}  (no recompute)",
                  f"                              {_gib(s.activation_bytes_recompute)}  "
                  "(model.recompute=full)",
                  f"  CUDA context, NCCL          {_gib(pl.headroom_bytes)}",
                  f"  total                       {_gib(s.total(pl.recompute) + pl.headroom_bytes)}"
                  f"  (recompute {'full' if pl.recompute else 'none'})"]
    return "\n".join(lines)


def run(args) -> int:
    from cascade_mega.config import load_config

    # nothing is written: a config need not name a run directory to be planned
    cfg = load_config(args.config, ["run_dir=unused", *args.overrides], world_size=args.gpus)
    vocab = cfg.model.vocab_size
    if not vocab:
        from cascade_mega.data import loader
        from cascade_mega.data.indexed import read_meta

        vocab = read_meta(loader.blend(loader.resolve_path(cfg.data.path))[0][0])["vocab_size"]
    pl = plan(cfg, args.gpus, vocab)
    print(render(pl))
    peak = pl.peak()
    if args.json:
        print(json.dumps({**asdict(pl), "peak_bytes": peak}))
    if peak > args.gpu_memory * GiB:
        fits = what_fits(cfg, args.gpus, vocab, int(args.gpu_memory * GiB))
        raise ConfigError(f"the layout needs {peak / GiB:.1f} GiB on its fullest GPU, more than "
                          f"--gpu-memory {args.gpu_memory:g} GiB: " +
                          (f"it fits with {' or '.join(fits)}" if fits else
                           "no single change fits it (distributed optimizer, sequence parallel, "
                           "recompute, micro-batch, pipeline or tensor ranks): combine them or "
                           "add GPUs"))
    return 0


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. parallel.tensor=8")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job (the world size)")
    p.add_argument("--gpu-memory", type=float, default=80.0,
                   help="GiB per GPU (default 80, an H100)")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
