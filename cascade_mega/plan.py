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
      query/key norm 2 S b (a + g) d e / t     (`model.qk_norm`: norm input, RoPE input)
      MoE layer      the router's scores, the dispatched rows and the experts' SwiGLU
                     (`moe_activation_bytes`), in place of the dense MLP
      context par.   + 2 n L b g d e / t       (the gathered K and V: the clean stream, n = 1, or
                                               every view of full diffusion, n = V)
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
from cascade_mega.config.objectives import layout_of
from cascade_mega.model.dims import model_dims

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
    expert: int = 1  # expert-parallel size
    expert_parameters: int = 0  # of them, expert weights on one GPU of the first stage
    sequence: str = ""  # the objective's layout (`layout_of`): kind
    rows: int = 0  # rows one sample occupies
    readout: int = 0  # of them, rows that carry a prediction

    def peak(self) -> int:
        return max(s.total(self.recompute) for s in self.stages) + self.headroom_bytes


def layer_parameters(cfg: CascadeConfig, vocab: int, experts: bool = False) -> tuple:
    """(dense, expert) parameters of one transformer layer on one rank: attention, norms and a
    dense MLP split by tensor parallel; an MoE layer's router (whole on every rank), shared
    expert (split by tensor parallel) and its E / EP local experts (split by expert-TP)."""
    x, p = model_dims(cfg, vocab), cfg.parallel
    t, h = p.tensor, x["h"]
    qkv = (x["a"] + 2 * x["g"]) * x["d"]
    dense = ((h + int(cfg.model.qkv_bias)) * qkv + x["a"] * x["d"] * h) // t + 2 * h + \
        2 * x["d"] * int(cfg.model.qk_norm)
    if not experts:
        return dense + 3 * x["f"] * h // t, 0
    moe = cfg.model.moe
    f_e, etp = moe.ffn_hidden_size or x["f"], p.expert_tensor or t
    dense += moe.num_experts * h + 3 * moe.shared_expert_size * h // t + \
        h * int(moe.shared_expert_gate)
    return dense, moe.num_experts // p.expert * 3 * f_e * h // etp


def stage_layers(cfg: CascadeConfig, stage: int) -> list:
    """The global layer indices pipeline stage `stage` holds (each virtual chunk's)."""
    p, n = cfg.parallel, cfg.model.num_layers
    chunks = p.virtual_pipeline or 1
    per = n // (p.pipeline * chunks)
    return [(v * p.pipeline + stage) * per + j for v in range(chunks) for j in range(per)]


def stage_parameters(cfg: CascadeConfig, vocab: int, first: bool, last: bool) -> tuple:
    """(dense, expert) parameters on one GPU of the first / last pipeline stage."""
    x, p = model_dims(cfg, vocab), cfg.parallel
    pattern = cfg.model.moe_pattern
    dense = expert = 0
    for i in stage_layers(cfg, 0 if first else p.pipeline - 1):
        d, e = layer_parameters(cfg, vocab, bool(pattern[i]))
        dense, expert = dense + d, expert + e
    table = x["V"] * x["h"] // p.tensor
    if first:
        dense += table
    if last:  # final norm and output layer (a tied output layer is a copy on another stage)
        dense += x["h"] + (0 if cfg.model.tie_embeddings and first else table)
    return dense, expert


def layer_activation_bytes(cfg: CascadeConfig, vocab: int, e: int,
                           experts: bool = False) -> tuple[int, int]:
    """(saved bytes of one layer, one micro-batch; bytes kept under full recompute)."""

    x, p, b = model_dims(cfg, vocab), cfg.parallel, cfg.train.micro_batch_size
    t = p.tensor
    S = layout_of(cfg).rows // p.context
    sp = t if p.sequence_parallel else 1
    h, g, d, f, a = x["h"], x["g"], x["d"], x["f"], x["a"]
    norms = 2 * (3 * S * b * h * e + 4 * S * b) // sp
    attention = (3 * S * b * h + 2 * S * b * g * d) * e // t + 4 * S * b * a // t + 16 * S * d
    if p.context > 1:  # the gathered K/V: the clean stream, or every view of full diffusion
        layout = layout_of(cfg)
        streams = cfg.diffusion.views if layout.kind == "full" else 1
        attention += 2 * streams * cfg.data.seq_len * b * g * d * e // t
    if cfg.model.qk_norm:  # each head's norm input and output (the RoPE input), and its rstd
        attention += (2 * S * b * (a + g) * d * e + 4 * S * b * (a + g)) // t
    mlp = moe_activation_bytes(cfg, S, b, x, e) if experts else 5 * S * b * f * e // t
    return norms + attention + mlp, S * b * h * e // sp


def moe_activation_bytes(cfg: CascadeConfig, S: int, b: int, x: dict, e: int) -> int:
    """An MoE layer's saved tensors, per micro-batch, for R = S b / sp routed rows on this rank
    (balanced routing: each rank's experts receive k R rows, times expert-TP when they are
    gathered over it): the router's fp32 logits, scores and top-k probabilities (3 x 4 R E), the
    dispatched rows (k R ETP h e) and the experts' SwiGLU with the routing weight applied
    before their second linear layer (6 k R f_e e, f_e split by ETP), and the shared expert's
    MLP. Measured on the CPU within 0.2 R h e bytes per layer (tests/test_plan.py)."""
    p, moe = cfg.parallel, cfg.model.moe
    t, k, h = p.tensor, moe.top_k, x["h"]
    etp = p.expert_tensor or t
    R = S * b // (t if p.sequence_parallel else 1)
    f_e = moe.ffn_hidden_size or x["f"]
    routed = k * R * etp
    shared = 5 * S * b * moe.shared_expert_size * e // t + 2 * S * b * e * int(
        moe.shared_expert_gate)
    return 12 * R * moe.num_experts + routed * h * e + 6 * routed * f_e * e // etp + shared


def dispatch_bytes(cfg: CascadeConfig, vocab: int, e: int) -> int:
    """The all-to-all buffers of the MoE layer running (sent and received rows, k R each, times
    expert-TP for the gathered ones): transient, one layer at a time."""

    p, moe = cfg.parallel, cfg.model.moe
    if not moe.enabled:
        return 0
    t = p.tensor
    R = layout_of(cfg).rows // p.context * cfg.train.micro_batch_size // (
        t if p.sequence_parallel else 1)
    return 2 * moe.top_k * R * (p.expert_tensor or t) * model_dims(cfg, vocab)["h"] * e


def head_activation_bytes(cfg: CascadeConfig, vocab: int, e: int) -> int:
    """Last stage: final norm, read-out hidden states, fp32 logits (per micro-batch)."""

    x, p, b = model_dims(cfg, vocab), cfg.parallel, cfg.train.micro_batch_size
    S = layout_of(cfg).rows // p.context
    sp = p.tensor if p.sequence_parallel else 1
    n = layout_of(cfg).readout // p.context
    return (2 * S * b * x["h"] * e + 4 * S * b) // sp + n * b * x["h"] * e + \
        n * b * x["V"] // p.tensor * 4


def plan(cfg: CascadeConfig, gpus: int, vocab: int) -> Plan:
    validate(cfg, gpus)
    p, t = cfg.parallel, cfg.train
    bf16 = t.precision != "fp32"  # "auto" is bf16 on the GPUs this plans for
    e = 2 if bf16 else 4
    dp = gpus // (p.tensor * p.pipeline * p.context)
    expert_dp = gpus // ((p.expert_tensor or p.tensor) * p.expert * p.pipeline)
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    layer_bytes = {on: layer_activation_bytes(cfg, vocab, e, bool(on))
                   for on in set(cfg.model.moe_pattern)}
    layers = cfg.model.num_layers // p.pipeline
    if p.pipeline == 1:
        in_flight = layers
    elif p.virtual_pipeline:
        in_flight = math.ceil(cfg.model.num_layers *
                              (1 + (p.pipeline - 1) / (p.pipeline * p.virtual_pipeline)))
    else:
        in_flight = layers * min(p.pipeline, micro)
    head = head_activation_bytes(cfg, vocab, e)
    layout = layout_of(cfg)  # the objective's rows (config/objectives.py)
    ids = 8 * t.micro_batch_size * layout.rows // p.context  # token ids the embedding keeps
    stages = []
    names = [("first", True, p.pipeline == 1)] + ([("last", False, True)] if p.pipeline > 1
                                                    else [])
    for name, first, last in names:
        dense, expert = stage_parameters(cfg, vocab, first, last)
        n = dense + expert
        # the distributed optimizer shards dense state over DP x CP, expert state over expert-DP
        shards = (dp * p.context, expert_dp) if p.distributed_optimizer else (1, 1)
        held = [layer_bytes[cfg.model.moe_pattern[i]]
                for i in stage_layers(cfg, 0 if first else p.pipeline - 1)]
        saved, kept = sum(a for a, _ in held), sum(k for _, k in held)
        largest = max(a for a, _ in held)
        flight = (in_flight if first else layers) / layers  # micro-batches of every layer
        extra = (head if last else 0) + (ids * min(p.pipeline, micro) if first else 0) + \
            dispatch_bytes(cfg, vocab, e)
        stages.append(StagePlan(
            stage=name if p.pipeline > 1 else "only",
            parameters=n, parameter_bytes=n * e, gradient_bytes=n * 4,
            optimizer_bytes=sum(c * (8 + (4 if bf16 else 0)) // s
                                for c, s in zip((dense, expert), shards)),
            activation_bytes=int(flight * saved) + extra,
            activation_bytes_recompute=int(flight * kept) + largest + extra))
    groups = sum(size > 1 for size in (p.tensor, p.pipeline, p.context, dp, p.expert))
    return Plan(gpus=gpus, tensor=p.tensor, pipeline=p.pipeline, context=p.context, data=dp,
                precision="bf16" if bf16 else "fp32", recompute=cfg.model.recompute == "full",
                stages=stages, headroom_bytes=CONTEXT_BYTES + groups * NCCL_BYTES_PER_GROUP,
                expert=p.expert, expert_parameters=sum(
                    stage_parameters(cfg, vocab, True, p.pipeline == 1)[1:]),
                sequence=layout.kind, rows=layout.rows, readout=layout.readout)


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
    layout = layout_of(cfg)  # long sequences: split them (whole blocks per chunk, `rules.py`)
    chunk = 4 * p.context * (1 if layout.kind == "full" else layout.block)
    if cfg.data.seq_len % chunk == 0:
        yield f"parallel.context={2 * p.context}", replace(
            cfg, parallel=replace(p, context=2 * p.context))


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
    experts = f" EP={pl.expert}" if pl.expert > 1 or pl.expert_parameters else ""
    lines = [f"layout: TP={pl.tensor} PP={pl.pipeline} CP={pl.context} DP={pl.data}{experts} "
             f"on {pl.gpus} GPUs, {pl.precision}",
             f"sequence: {pl.sequence}, {pl.rows} rows per sample ({pl.readout} read out), "
             "the objective's layout"]
    for s in pl.stages:
        lines += [f"per GPU of the {s.stage} stage:" if s.stage != "only" else "per GPU:",
                  f"  parameters      {s.parameters / 1e9:8.3f} B  {_gib(s.parameter_bytes)}",
                  *([f"    of which experts {pl.expert_parameters / 1e9:8.3f} B"]
                    if pl.expert_parameters and s is pl.stages[0] else []),
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
    from cascade_mega.config import ConfigError, load_config

    if args.gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
    if not args.gpu_memory > 0:
        raise ConfigError(f"--gpu-memory must be > 0 (GiB), got {args.gpu_memory}")
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
