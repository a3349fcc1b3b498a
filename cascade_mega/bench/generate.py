"""`cascade bench generate`: block decoding (each policy) against AR decoding with a KV cache.

Both models come from the quickstart recipe (same size, data, seed and 500 steps; `runs/quickstart`
and `runs/ar_quickstart` by default, trained first when they have no checkpoint): the two runs
share their first 250 steps (the quickstart's B = 1 phase is AR training), then one converts to
B = 16 and the other goes on as AR. The judge of generative perplexity is the AR baseline unless
`--judge` names another AR run; judging its own samples favours the baseline. For each prompt every
row generates in turn (so machine noise hits all rows alike), at batch 1 with the same sampling;
tokens/s is the median of `--repeats` passes.

Speed alone is easy to buy with degenerate text, and generative perplexity rewards it (repeated
tokens are cheap to predict), so each row reports its diversity beside it: the unigram entropy of
all samples pooled (bits), the mean entropy per sample, and the share of repeated n-grams within
a sample (n = 2, 3, 4 and their mean, `repetition`), each also as a ratio to AR's. The `data`
row gives the same figures for held-out text of the validation split (same length, after a
prompt of the prompts' mean length): what a model's samples should approach. `--batch 1,8,32`
adds throughput at larger batches (block decoding and AR, both batched with their caches).
Both decoders run at `--precision` (default: their runs' training precision, fp32 on CPU); the
judge always scores in fp32.

A model with a causal clean stream (the quickstart's) adds two kinds of rows:
`causal`, its causal stream decoded one token per forward with the cache (what speculative
decoding must equal in law), and `speculative/DRAFT` (DRAFT written like any row, e.g.
`speculative/fixed@2`, `speculative/adaptive:margin@3`; `speculative+redraft/...` drafts a block
again after a partial acceptance; `speculative#4/...` verifies at most 4 tokens a forward, #0
every drafted one; default 2): the draft policy drafts each block, the causal stream
verifies it. They report their speed against the `causal` row too, and the
acceptance of drafted tokens by their position in the block.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from statistics import median

import torch

from cascade_mega.config import PRECISIONS
from cascade_mega.data.tokenizer import same_tokenizer
from cascade_mega.inference.policies import Policy
from cascade_mega.inference.sampling import Sampling

RUNS = {"bd": ("runs/quickstart", "configs/quickstart.yaml"),
        "ar": ("runs/ar_quickstart", "configs/ar_quickstart.yaml")}


DEFAULT_ROWS = "ar,fixed:drawn,fixed,fixed:random,threshold,adaptive,entropy,adaptive+remask"


def add_arguments(p) -> None:
    p.add_argument("--bd", default=RUNS["bd"][0], help="block-diffusion run or checkpoint")
    p.add_argument("--ar", default=RUNS["ar"][0], help="AR run or checkpoint (the baseline)")
    p.add_argument("--judge", default=None, help="AR run or checkpoint whose perplexity of the "
                   "samples is reported (default: the --ar model)")
    p.add_argument("--prompts-file", default="configs/prompts/shakespeare.txt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--policies", default=DEFAULT_ROWS,
                   help="rows, POLICY[:ORDER][@STEPS][+remask] "
                   "each (policies.py; STEPS: this row's --steps); ar: the AR baseline, always "
                   "first")
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=3, help="fixed: steps per block; adaptive and "
                   "entropy: cap (3 for B = 16: ~5 tokens a forward)")
    p.add_argument("--bound", type=float, default=Policy.bound,
                   help="entropy: EB-sampler's gamma (nats)")
    p.add_argument("--remask", type=float, default=0.3, help="+remask rows: remask decisions "
                   "made below this probability")
    p.add_argument("--greedy", action="store_true", help="greedy instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0, help="of every row, AR's too")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt and row (seeds "
                   "seed .. seed + samples - 1): generative perplexity of one 1k-token draw "
                   "varies by ~15 %% from seed to seed")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; tokens/s is their "
                   "median (the samples are the same in every pass)")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated: above 1, each "
                   "row also decodes the samples in batches of that size (throughput only)")
    p.add_argument("--precision", choices=PRECISIONS, default="", help="of both decoders (default: "
                   "each run's train.precision); the judge scores in fp32")
    p.add_argument("--json", action="store_true", help="end with one JSON line")


def parse_rows(spec: str, args) -> dict:
    """'ar,fixed:random,adaptive+remask' -> {label: Policy}; one message for a bad row."""
    from cascade_mega.inference.decode import GenerationError

    rows = {"ar": Policy("fixed", 1)}
    for label in [r.strip() for r in spec.split(",") if r.strip()]:
        if label == "ar":
            continue
        if label == "causal":
            rows[label] = Policy("causal")
            continue
        speculative, _, drafted = label.partition("/")
        head_, _, cap = speculative.partition("#")
        if head_ in ("speculative", "speculative+redraft"):
            draft = parse_rows(drafted or "fixed", args)
            name = next((k for k in draft if k != "ar"), None)
            if name is None or draft[name].name in ("speculative", "causal") or \
                    draft[name].remask:
                raise GenerationError(f"--policies row {label!r}: the draft must be a block "
                                      "policy without remasking, e.g. speculative/fixed@2")
            d = draft[name]
            rows[label] = Policy("speculative", d.steps, d.tau, d.order, d.bound, draft=d.name,
                                 redraft=head_.endswith("+redraft"),
                                 verify=int(cap) if cap else Policy.verify)
            continue
        head, _, extra = label.partition("+")
        head, _, steps = head.partition("@")
        name, _, order = head.partition(":")
        if extra not in ("", "remask"):
            raise GenerationError(f"--policies row {label!r}: '+{extra}' is not an option "
                                  "(only +remask)")
        try:
            rows[label] = Policy(name, int(steps) if steps else args.steps, args.tau,
                                 order or "confidence", args.bound, args.remask if extra else 0.0)
        except ValueError as err:
            raise GenerationError(f"--policies row {label!r}: {err}") from None
    return rows


def _ensure_trained(path: str, config: str) -> None:
    """Train the default run when it has no checkpoint (so the bench runs on a fresh clone)."""
    from cascade_mega import checkpoint

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
    net = ar_decoder.net
    prep = to_device(objective.prepare(ids, labels, torch.ones_like(ids), net.cfg,
                                       net.tok.mask_id, None, eod_id=net.tok.eod))
    ce, _ = net.model(prep.input_ids, prep.position_ids, prep.layout,
                      output_processor=predict_and_score, output_processor_context=prep.readout,
                      noise_levels=prep.noise_levels)
    return float(ce[0, len(prompt) - 1:].double().sum())


def entropy_bits(tokens) -> float:
    counts = Counter(tokens)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def repeated(samples, n: int) -> float:
    """Share of the samples' n-grams that repeat an earlier n-gram of the same sample."""
    total = repeats = 0
    for tokens in samples:
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total, repeats = total + len(grams), repeats + len(grams) - len(set(grams))
    return repeats / total if total else 0.0


def quality(samples, nll: float) -> dict:
    """The figures of one row from its samples (token lists) and their summed judge NLL."""
    pooled = [t for sample in samples for t in sample]
    row = {"gen_ppl": math.exp(nll / max(len(pooled), 1)), "entropy": entropy_bits(pooled),
           "sample_entropy": sum(map(entropy_bits, samples)) / max(len(samples), 1)}
    for n in (2, 3, 4):
        row[f"rep_{n}"] = repeated(samples, n)
    row["repetition"] = sum(row[f"rep_{n}"] for n in (2, 3, 4)) / 3
    return row


def held_out(decoder, count: int, prompt_len: int, length: int):
    """(prompt, continuation) pairs from the run's validation split: the text a model should
    approach, judged like the samples."""
    from cascade_mega.data import loader

    cfg = decoder.net.cfg
    valid = loader.build_splits(cfg, decoder.net.tok, loader.resolve_path(cfg.data.path), 1)[1]
    need = prompt_len + length
    if need > cfg.data.seq_len:
        prompt_len = max(1, cfg.data.seq_len - length)
    pairs = []
    for i in range(count):
        seq = valid.micro_batch(i, 1).tokens[0].tolist()
        pairs.append((seq[:prompt_len], seq[prompt_len:prompt_len + length]))
    return pairs


def run(args) -> dict:
    from cascade_mega.inference.command import read_prompts
    from cascade_mega.inference.decode import GenerationError
    from cascade_mega.inference.load import load_decoder
    from cascade_mega.checkpoint import CheckpointError

    if args.samples < 1:  # before anything is trained or loaded
        raise GenerationError(f"--samples must be >= 1, got {args.samples}")
    if args.repeats < 1:
        raise GenerationError(f"--repeats must be >= 1, got {args.repeats}")
    try:
        batches = sorted({int(b) for b in args.batch.split(",") if b.strip()} | {1})
    except ValueError:
        raise GenerationError(f"--batch takes comma-separated sizes, got {args.batch!r}") from None
    if batches[0] < 1:
        raise GenerationError(f"--batch sizes must be >= 1, got {args.batch!r}")
    rows = parse_rows(args.policies, args)
    try:  # the sampling knobs, before anything is loaded
        Sampling(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p)
    except ValueError as err:
        raise GenerationError(str(err)) from None
    texts = read_prompts(args.prompts_file)
    from cascade_mega.checkpoint import locate

    given = [(w, p) for w, p in (("bd", args.bd), ("ar", args.ar), ("judge", args.judge))
             if p and p != RUNS.get(w, (None,))[0]]
    for _, path in given:  # every checkpoint named is checked before a default one is trained
        locate(path)
    for which, path in (("bd", args.bd), ("ar", args.ar)):
        if path == RUNS[which][0]:
            _ensure_trained(*RUNS[which])
    bd = load_decoder(args.bd, precision=args.precision)
    ar = load_decoder(args.ar, precision=args.precision)
    dtypes = [next(d.net.model.parameters()).dtype for d in (bd, ar)]
    judge = ar if dtypes[1] == torch.float32 and not args.judge else \
        load_decoder(args.judge or args.ar, precision="fp32")
    for flag, dec in (("--ar", ar), ("--judge", judge)):
        if not dec.net.causal:
            raise CheckpointError(f"{flag} {getattr(args, flag[2:])} is not an AR checkpoint")
        if not same_tokenizer(dec.net.tok, bd.net.tok):
            raise CheckpointError(f"{flag} {getattr(args, flag[2:])} uses another tokenizer "
                                  f"than --bd {args.bd}")
    decoders = {name: (ar if name == "ar" else bd) for name in rows}
    for name, policy in rows.items():  # warm-up: caches, allocator
        decoders[name].generate([decoders[name].net.tok.encode(texts[0])], 16, policy,
                                Sampling(greedy=args.greedy))
    draws = [(text, Sampling(greedy=args.greedy, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed + k))
             for k in range(1 if args.greedy else args.samples) for text in texts]
    times = {(name, b): [] for name in rows for b in batches}
    stats = {name: {"forwards": 0, "samples": [], "nll": 0.0, "rounds": []} for name in rows}
    for repeat in range(args.repeats):
        spent = {name: 0.0 for name in rows}
        for text, sampling in draws:  # batch 1: every row in turn per draw (noise hits all)
            for name, policy in rows.items():
                dec = decoders[name]
                prompt = dec.net.tok.encode(text)
                dec.forwards = 0
                start = time.perf_counter()
                [out] = dec.generate([prompt], args.max_new_tokens, policy, sampling)
                spent[name] += time.perf_counter() - start
                if repeat == 0:
                    s = stats[name]
                    s["forwards"] += dec.forwards
                    s["samples"].append(out.tokens)
                    s["rounds"] += out.speculation
                    s["nll"] += generative_nll(judge, prompt, out.tokens)
        for name in rows:
            times[name, 1].append(sum(map(len, stats[name]["samples"])) / spent[name])
        for b in batches[1:]:
            for name, policy in rows.items():
                times[name, b].append(_batched(decoders[name], policy, draws, b, args))
    table = []
    for name, s in stats.items():
        n = max(sum(map(len, s["samples"])), 1)
        table.append({"policy": name, "tokens_per_s": median(times[name, 1]),
                      "forwards_per_token": s["forwards"] / n,
                      "tokens_per_forward": n / max(s["forwards"], 1),
                      **quality(s["samples"], s["nll"])})
        if rows[name].name == "speculative":
            table[-1]["acceptance_by_position"] = acceptance(s["rounds"], bd.B)
    base = table[0]
    causal = next((r for r in table if r["policy"] == "causal"), None)
    for row in table:
        row["speedup_vs_ar"] = row["tokens_per_s"] / base["tokens_per_s"]
        if causal is not None:
            row["speedup_vs_causal"] = row["tokens_per_s"] / causal["tokens_per_s"]
        for key in ("gen_ppl", "entropy", "repetition"):
            row[f"{key}_vs_ar"] = row[key] / base[key] if base[key] else float("nan")
    prompt_len = round(sum(len(bd.net.tok.encode(t)) for t in texts) / len(texts))
    data = {"policy": "data"}
    pairs = held_out(bd, len(draws), prompt_len, args.max_new_tokens)
    data.update(quality([c for _, c in pairs], sum(generative_nll(judge, p, c) for p, c in pairs)))
    for key in ("gen_ppl", "entropy", "repetition"):
        data[f"{key}_vs_ar"] = data[key] / base[key] if base[key] else float("nan")
    batched = [{"policy": name, "batch": b, "tokens_per_s": median(times[name, b]),
                "speedup_vs_ar": median(times[name, b]) / median(times["ar", b])}
               for b in batches for name in rows]
    how = "greedy" if args.greedy else (f"sampling (temperature {args.temperature}, top-k "
                                        f"{args.top_k or 'off'}, top-p {args.top_p})")
    # one name unless the runs' precisions differ
    dtype = "/".join(sorted({str(t).replace("torch.", "") for t in dtypes}))
    print(f"bench generate  {len(draws)} samples ({len(texts)} prompts) x {args.max_new_tokens} "
          f"new tokens, batch 1, {how}, {dtype}; B = {bd.B}, tau = {args.tau}, "
          f"steps = {args.steps}, bound = {args.bound}, remask = {args.remask}; tokens/s: median "
          f"of {args.repeats}")
    print(f"  {'policy':<18}{'tokens/s':>9}{'vs AR':>7}{'fwd/tok':>8}{'gen ppl':>9}{'vs AR':>6}"
          f"{'entropy':>8}{'vs AR':>6}{'per-sample':>11}{'rep':>7}{'vs AR':>6}")
    for r in table + [data]:
        speed = (f"{r['tokens_per_s']:>9.1f}{r['speedup_vs_ar']:>6.2f}x"
                 f"{r['forwards_per_token']:>8.3f}") if "tokens_per_s" in r else " " * 24
        print(f"  {r['policy']:<18}{speed}{r['gen_ppl']:>9.1f}{r['gen_ppl_vs_ar']:>6.2f}"
              f"{r['entropy']:>8.2f}{r['entropy_vs_ar']:>6.2f}{r['sample_entropy']:>11.2f}"
              f"{r['repetition']:>7.3f}{r['repetition_vs_ar']:>6.2f}")
    print("  data: held-out text of the same length after a prompt of the prompts' mean length")
    for r in table:
        if "acceptance_by_position" in r:
            speed = f", {r['speedup_vs_causal']:.2f}x the causal row" if causal else ""
            print(f"  {r['policy']}: {r['tokens_per_forward']:.2f} tokens/forward{speed}; "
                  "drafted tokens accepted, by position in the block: " +
                  " ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_by_position"]))
    if batches[1:]:
        print(f"  batched tokens/s (ratio to AR at the same batch size), median of {args.repeats}")
        print(f"  {'policy':<18}" + "".join(f"{'batch ' + str(b):>18}" for b in batches))
        for name in rows:
            cells = [r for r in batched if r["policy"] == name]
            print(f"  {name:<18}" + "".join(
                f"{c['tokens_per_s']:>10.1f} ({c['speedup_vs_ar']:.2f}x)" for c in cells))
    result = {"rows": table, "data": data, "batched": batched, "block_size": bd.B,
              "prompts": len(texts), "samples": len(draws), "max_new_tokens": args.max_new_tokens,
              "dtype": dtype, "repeats": args.repeats}
    if args.json:
        print(json.dumps(result))
    return result


def acceptance(rounds, B: int) -> list:
    """Share of drafted tokens accepted at each position of the block (None: never drafted)."""
    drafted, accepted = [0] * B, [0] * B
    for r in rounds:
        for j in range(r["drafted"]):
            drafted[r["offset"] + j] += 1
            accepted[r["offset"] + j] += j < r["accepted"]
    return [a / d if d else None for a, d in zip(accepted, drafted)]


def _batched(dec, policy, draws, size: int, args) -> float:
    """tokens/s decoding the draws' prompts in batches of `size` (cycled to fill the last)."""
    tokens, spent = 0, 0.0
    for first in range(0, len(draws), size):
        group = [draws[(first + i) % len(draws)] for i in range(size)]
        prompts = [dec.net.tok.encode(text) for text, _ in group]
        start = time.perf_counter()
        outs = dec.generate(prompts, args.max_new_tokens, policy, group[0][1])
        spent += time.perf_counter() - start
        tokens += sum(len(o.tokens) for o in outs)
    return tokens / spent
