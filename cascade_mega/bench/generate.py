"""`cascade bench generate`: block decoding (each policy) against AR decoding with a KV cache.

Both models come from the quickstart recipe (same size, data and steps; `runs/quickstart` and
`runs/ar_quickstart` by default, trained first when they have no checkpoint). For each prompt every
row generates in turn (so machine noise hits all rows alike), at batch 1 with the same sampling.
Per row: tokens/s, forwards per generated token, the generative perplexity (the AR model's
perplexity of the generated tokens given their prompt) and the unigram entropy of the samples in
bits (low entropy = repetition, which also lowers perplexity).
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

from cascade_mega.inference.policies import Policy
from cascade_mega.inference.sampling import Sampling

RUNS = {"bd": ("runs/quickstart", "configs/quickstart.yaml"),
        "ar": ("runs/ar_quickstart", "configs/ar_quickstart.yaml")}


def add_arguments(p) -> None:
    p.add_argument("--bd", default=RUNS["bd"][0], help="block-diffusion run or checkpoint")
    p.add_argument("--ar", default=RUNS["ar"][0], help="AR run or checkpoint (the baseline and "
                   "the judge of generative perplexity)")
    p.add_argument("--prompts-file", default="configs/prompts/shakespeare.txt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=4, help="fixed: steps per block; adaptive: cap")
    p.add_argument("--greedy", action="store_true", help="greedy instead of sampling")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
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

    seq = torch.tensor(prompt + tokens)
    ids, labels = seq[:-1][None], seq[1:][None]
    prep = objective.prepare(ids, labels, torch.ones_like(ids), ar_decoder.cfg,
                             ar_decoder.tok.mask_id, None, eod_id=ar_decoder.tok.eod)
    ce, _ = ar_decoder.model(prep.input_ids, prep.position_ids, prep.layout,
                             output_processor=predict_and_score,
                             output_processor_context=prep.readout)
    return float(ce[0, len(prompt) - 1:].double().sum())


def entropy_bits(tokens) -> float:
    counts = Counter(tokens)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def run(args) -> dict:
    from cascade_mega.inference.load import load_decoder

    for which, path in (("bd", args.bd), ("ar", args.ar)):
        if path == RUNS[which][0]:
            _ensure_trained(*RUNS[which])
    bd, ar = load_decoder(args.bd), load_decoder(args.ar)
    if ar.cfg.diffusion.objective != "ar":
        raise ValueError(f"--ar {args.ar} is not an AR checkpoint")
    with open(args.prompts_file) as f:
        texts = [line.rstrip("\n") for line in f if line.strip()]
    sampling = Sampling(greedy=args.greedy, top_p=args.top_p, seed=args.seed)
    rows = {"ar": (ar, Policy("fixed", 1)),
            "fixed": (bd, Policy("fixed", args.steps)),
            "threshold": (bd, Policy("threshold", tau=args.tau)),
            "adaptive": (bd, Policy("adaptive", steps=args.steps, tau=args.tau))}
    stats = {k: {"time": 0.0, "forwards": 0, "tokens": [], "nll": 0.0} for k in rows}
    for name, (dec, policy) in rows.items():  # warm-up: caches, allocator
        dec.generate([dec.tok.encode(texts[0])], 16, policy, sampling)
    for text in texts:
        for name, (dec, policy) in rows.items():
            prompt = dec.tok.encode(text)
            dec.forwards = 0
            start = time.perf_counter()
            [out] = dec.generate([prompt], args.max_new_tokens, policy, sampling)
            s = stats[name]
            s["time"] += time.perf_counter() - start
            s["forwards"] += dec.forwards
            s["tokens"] += out.tokens
            s["nll"] += generative_nll(ar, prompt, out.tokens)
    table = []
    for name, s in stats.items():
        n = max(len(s["tokens"]), 1)
        table.append({"policy": name, "tokens_per_s": n / s["time"],
                      "forwards_per_token": s["forwards"] / n,
                      "gen_ppl": math.exp(s["nll"] / n), "entropy": entropy_bits(s["tokens"])})
    for row in table:
        row["speedup_vs_ar"] = row["tokens_per_s"] / table[0]["tokens_per_s"]
    how = "greedy" if args.greedy else f"sampling (top-p {args.top_p})"
    print(f"bench generate  {len(texts)} prompts x {args.max_new_tokens} new tokens, batch 1, "
          f"{how}; B = {bd.B}, tau = {args.tau}, steps = {args.steps}")
    print(f"  {'policy':<10}{'tokens/s':>10}{'fwd/token':>11}{'gen ppl':>10}{'entropy':>9}"
          f"{'vs AR':>8}")
    for r in table:
        print(f"  {r['policy']:<10}{r['tokens_per_s']:>10.1f}{r['forwards_per_token']:>11.3f}"
              f"{r['gen_ppl']:>10.1f}{r['entropy']:>9.2f}{r['speedup_vs_ar']:>7.2f}x")
    result = {"rows": table, "block_size": bd.B, "prompts": len(texts),
              "max_new_tokens": args.max_new_tokens}
    if args.json:
        print(json.dumps(result))
    return result
