"""Megatron-LM's `tools/checkpoint/convert.py`, over this project's conversion (`cascade convert`,
`cascade_mega/convert/`), with Megatron's flags:

    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver mcore \\
        --load-dir Qwen2.5-0.5B --save-dir runs/qwen-0.5b --target-tensor-parallel-size 2

Loaders: hf (a Hugging Face Llama / Qwen2 directory; `llama_mistral` is accepted for it), mcore
(a run or checkpoint of this project), gguf (a GGUF file). Savers: mcore (a run directory
`train.init_from` and `cascade generate` read; `core` is accepted for it) or hf. mcore -> mcore
reshards a checkpoint to another tensor / pipeline layout. Runs from a source checkout.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

LOADERS = {"hf": "hf", "llama_mistral": "hf", "mcore": "mcore", "core": "mcore", "gguf": "gguf"}
SAVERS = {"mcore": "mcore", "core": "mcore", "hf": "hf", "llama_mistral": "hf"}
DIRECTIONS = {("hf", "mcore"): "hf-to-mcore", ("mcore", "hf"): "mcore-to-hf",
              ("mcore", "mcore"): "mcore-to-mcore", ("gguf", "hf"): "gguf-to-hf"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-type", default="GPT", choices=("GPT",))
    p.add_argument("--loader", required=True, choices=sorted(LOADERS))
    p.add_argument("--saver", required=True, choices=sorted(SAVERS))
    p.add_argument("--load-dir", required=True, help="what to read (a GGUF file for gguf)")
    p.add_argument("--save-dir", required=True, help="the directory to write (must not exist)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--objective", choices=("ar", "block_diffusion"), default="ar",
                   help="hf -> mcore: the objective the run will train")
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--bf16", action="store_true", help="write bf16 weights (default fp32)")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    pair = LOADERS[args.loader], SAVERS[args.saver]
    if pair not in DIRECTIONS:
        p.error(f"no conversion from --loader {args.loader} to --saver {args.saver}; one of: "
                + ", ".join(f"{a} -> {b}" for a, b in DIRECTIONS))
    from cascade_mega.cli import main as cascade

    return cascade(["convert", DIRECTIONS[pair], args.load_dir, args.save_dir,
                    "--objective", args.objective, "--block-size", str(args.block_size),
                    "--seq-len", str(args.seq_len),
                    "--tensor", str(args.target_tensor_parallel_size),
                    "--pipeline", str(args.target_pipeline_parallel_size),
                    "--dtype", "bf16" if args.bf16 else "fp32",
                    "--max-shard-gb", str(args.max_shard_gb)])


if __name__ == "__main__":
    sys.exit(main())
