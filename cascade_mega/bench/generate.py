"""`cascade bench generate`: block decoding (each policy) against AR decoding with a KV cache.

Both models come from the quickstart recipe (same size, data, seed and 500 steps; `runs/quickstart`
and `runs/ar_quickstart` by default, trained first when they have no checkpoint): the two runs
share their first 250 steps (the quickstart's B = 1 phase is AR training), then one converts to
B = 16 and the other goes on as AR. The judge of generative perplexity is the AR baseline unless
`--judge` names another AR run; judging its own samples favours the baseline. For each prompt every
row generates in turn (so machine noise hits all rows alike), at batch 1 with the same sampling.
Per row: tokens/s, forwards per generated token, the generative perplexity (the AR model's
perplexity of the generated tokens given their prompt) and the unigram entropy of the samples in
bits (low entropy = repetition, which also lowers perplexity). Both decoders run at `--precision`
(default: their runs' training precision, fp32 on CPU); the judge always scores in fp32.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import Counter

import torch

from cascade_mega.config import PRECISIONS
from cascade_mega.data.tokenizer import same_tokenizer
from cascade_mega.inference.policies import Policy
from cascade_mega.inference.sampling import Sampling

RUNS = {"bd": ("runs/quickstart", "configs/quickstart.yaml"),
        "ar": ("runs/ar_quickstart", "configs/ar_quickstart.yaml")}


def add_arguments(p) -> None:
    p.add_argument("--bd", default=RUNS["bd"][0], help="block-diffusion run or checkpoint")
    p.add_argument("--ar", default=RUNS["ar"][0], help="AR run or checkpoint (the baseline)")
    p.add_argument("--judge", default=None, help="AR run or checkpoint whose perplexity of the "
                   "samples is reported (default: the --ar model)")
    p.add_argument("--prompts-file", default="configs/prompts/shakespeare.txt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=3, help="fixed: steps per block; adaptive: cap "
                   "(3 for B = 16: ~5 tokens a forward)")
    p.add_argument("--greedy", action="store_true", help="greedy instead of sampling")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt and row (seeds "
                   "seed .. seed + samples - 1): generative perplexity of one 1k-token draw "
                   "varies by ~15 %% from seed to seed")
    p.add_argument("--precision", choices=PRECISIONS, default="", help="of both decoders (default: "
                   "each run's train.precision); the judge scores in fp32")
    p.add_argument("--json", action="store_true", help="end with one JSON line")


def _ensure_trained(path: str, config: str) -> None:
    """Train the default run when it has no checkpoint (so the bench runs on a fresh clone)."""
    from cascade_mega.train import checkpoint

    if os.path.isdir(path) and checkpoint.latest(os.path.join(path, "checkpoints")):
        return
    print(f"bench generate: training {path} from {config} first", flush=True)
    proc = subprocess.run([sys.executable, "-m", "cascade_mega", "train", config,
                           "tracking.enabled=false"])
    if proc.returncode != 0:
        raise RuntimeError(f"training {config} failed")


@torch.no_grad()
def generative_nll(ar_decoder, prompt, tokens) -> float:
    """Summed negative log-likelihood of `tokens` after `prompt` under the AR model."""
    from cascade_mega.diffusion import objective
    from cascade_mega.model.gpt import predict_and_score
    from cascade_mega.runtime.device import to_device

    seq = torch.tensor(prompt + tokens)
    ids, labels = seq[:-1][None], seq[1:][None]
    prep = to_device(objective.prepare(ids, labels, torch.ones_like(ids), ar_decoder.cfg,
                                       ar_decoder.tok.mask_id, None, eod_id=ar_decoder.tok.eod))
    ce, _ = ar_decoder.model(prep.input_ids, prep.position_ids, prep.layout,
                             output_processor=predict_and_score,
                             output_processor_context=prep.readout)
    return float(ce[0, len(prompt) - 1:].double().sum())


def entropy_bits(tokens) -> float:
    counts = Counter(tokens)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def run(args) -> dict:
    from cascade_mega.inference.decode import GenerationError
    from cascade_mega.inference.load import load_decoder
    from cascade_mega.train.checkpoint import CheckpointError

    if args.samples < 1:  # before anything is trained or loaded
        raise GenerationError(f"--samples must be >= 1, got {args.samples}")
    for which, path in (("bd", args.bd), ("ar", args.ar)):
        if path == RUNS[which][0]:
            _ensure_trained(*RUNS[which])
    bd = load_decoder(args.bd, precision=args.precision)
    ar = load_decoder(args.ar, precision=args.precision)
    dtypes = [next(d.model.parameters()).dtype for d in (bd, ar)]
    judge = ar if dtypes[1] == torch.float32 and not args.judge else \
        load_decoder(args.judge or args.ar, precision="fp32")
    for flag, dec in (("--ar", ar), ("--judge", judge)):
        if dec.cfg.diffusion.objective != "ar":
            raise CheckpointError(f"{flag} {getattr(args, flag[2:])} is not an AR checkpoint")
        if not same_tokenizer(dec.tok, bd.tok):
            raise CheckpointError(f"{flag} {getattr(args, flag[2:])} uses another tokenizer "
                                  f"than --bd {args.bd}")
    with open(args.prompts_file) as f:
        texts = [line.rstrip("\n") for line in f if line.strip()]
    rows = {"ar": (ar, Policy("fixed", 1)),
            "fixed": (bd, Policy("fixed", args.steps)),
            "threshold": (bd, Policy("threshold", tau=args.tau)),
            "adaptive": (bd, Policy("adaptive", steps=args.steps, tau=args.tau))}
    stats = {k: {"time": 0.0, "forwards": 0, "tokens": [], "nll": 0.0} for k in rows}
    for name, (dec, policy) in rows.items():  # warm-up: caches, allocator
        dec.generate([dec.tok.encode(texts[0])], 16, policy, Sampling(greedy=args.greedy))
    draws = [(text, Sampling(greedy=args.greedy, top_p=args.top_p, seed=args.seed + k))
             for k in range(1 if args.greedy else args.samples) for text in texts]
    for text, sampling in draws:
        for name, (dec, policy) in rows.items():
            prompt = dec.tok.encode(text)
            dec.forwards = 0
            start = time.perf_counter()
            [out] = dec.generate([prompt], args.max_new_tokens, policy, sampling)
            s = stats[name]
            s["time"] += time.perf_counter() - start
            s["forwards"] += dec.forwards
            s["tokens"] += out.tokens
            s["nll"] += generative_nll(judge, prompt, out.tokens)
    table = []
    for name, s in stats.items():
        n = max(len(s["tokens"]), 1)
        table.append({"policy": name, "tokens_per_s": n / s["time"],
                      "forwards_per_token": s["forwards"] / n,
                      "gen_ppl": math.exp(s["nll"] / n), "entropy": entropy_bits(s["tokens"])})
    for row in table:
        row["speedup_vs_ar"] = row["tokens_per_s"] / table[0]["tokens_per_s"]
    how = "greedy" if args.greedy else f"sampling (top-p {args.top_p})"
    # one name unless the runs' precisions differ
    dtype = "/".join(sorted({str(t).replace("torch.", "") for t in dtypes}))
    print(f"bench generate  {len(draws)} samples ({len(texts)} prompts) x {args.max_new_tokens} "
          f"new tokens, batch 1, {how}, {dtype}; B = {bd.B}, tau = {args.tau}, "
          f"steps = {args.steps}")
    print(f"  {'policy':<10}{'tokens/s':>10}{'fwd/token':>11}{'gen ppl':>10}{'entropy':>9}"
          f"{'vs AR':>8}")
    for r in table:
        print(f"  {r['policy']:<10}{r['tokens_per_s']:>10.1f}{r['forwards_per_token']:>11.3f}"
              f"{r['gen_ppl']:>10.1f}{r['entropy']:>9.2f}{r['speedup_vs_ar']:>7.2f}x")
    result = {"rows": table, "block_size": bd.B, "prompts": len(texts), "samples": len(draws),
              "max_new_tokens": args.max_new_tokens, "dtype": dtype}
    if args.json:
        print(json.dumps(result))
    return result
