"""`cascade generate`: sample from a run or checkpoint, streaming each decided block to stdout."""

from __future__ import annotations

import json
import sys
import time

from cascade_mega.config import PRECISIONS
from cascade_mega.inference.policies import DRAFTS, ORDERS, POLICIES, Policy
from cascade_mega.inference.sampling import Sampling


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="run directory (its latest checkpoint) or a "
                   "checkpoint folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--policy", choices=POLICIES, default=Policy.name,
                   help="how many positions a step decides (inference/policies.py): fixed: "
                        "--steps per block; threshold: --tau; adaptive: --tau with at most "
                        "--steps per block; entropy: EB-sampler's rule with --bound, at most "
                        "--steps per block; tweedie: the score model's exact reverse step, "
                        "--steps per block (score-entropy checkpoints; MDLM's ancestral step on "
                        "others); speculative: --draft drafts each block, the causal clean stream "
                        "verifies it (checkpoints with diffusion.clean_stream=causal); causal: "
                        "that stream alone, one token per forward")
    p.add_argument("--draft", choices=DRAFTS, default=Policy.draft,
                   help="--policy speculative: the policy that drafts each block, with --steps, "
                        "--tau, --order and --bound")
    p.add_argument("--verify", type=int, default=Policy.verify, help="--policy speculative: the "
                   "most drafted tokens one forward verifies (0: the rest of the block)")
    p.add_argument("--redraft", action="store_true", help="--policy speculative: after a "
                   "partial acceptance draft the block again (default: verify the rest of the "
                   "draft)")
    p.add_argument("--order", choices=ORDERS, default=Policy.order,
                   help="which positions, from their distributions before any draw "
                        "(random: MDLM's ancestral order, with --policy fixed; a fixed count "
                        "per step where MDLM draws a Binomial one)")
    p.add_argument("--steps", type=int, default=Policy.steps)
    p.add_argument("--tau", type=float, default=Policy.tau)
    p.add_argument("--bound", type=float, default=Policy.bound,
                   help="entropy: EB-sampler's gamma, the most the summed entropy (nats) of the "
                   "positions one step decides may exceed their largest")
    p.add_argument("--remask", type=float, default=0.0, help="remask decisions made below this "
                   "probability while the block's step budget lasts (deterministic threshold "
                   "remasking, not ReMDM's posterior remasking; 0: off)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    full = p.add_argument_group("full-diffusion checkpoints (block_size = seq_len)")
    full.add_argument("--cache", choices=("none", "prefix", "dual"),
                      help="Fast-dLLM's approximate KV cache (default dual; none: exact, a "
                           "whole-canvas forward every step)")
    full.add_argument("--decode-block", type=int,
                      help="tokens decided left to right as one block (default 32)")
    full.add_argument("--guidance", type=float,
                      help="classifier-free guidance scale g (default 0: off)")
    p.add_argument("--precision", choices=PRECISIONS, default="", help="weights and activations "
                   "(default: the run's train.precision; auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (tokens, text, per-block statistics)")


def read_prompts(path: str) -> list:
    """One prompt per non-empty line of a UTF-8 file; one message for a file that is not."""
    from cascade_mega.inference.decode import GenerationError

    try:
        with open(path, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    except UnicodeDecodeError as err:
        raise GenerationError(f"{path}: not UTF-8 text (byte {err.start}: "
                              f"{err.object[err.start:err.start + 1]!r})") from None
    except OSError as err:
        raise GenerationError(f"{path}: cannot read the prompts ({err.strerror})") from None
    if not texts:
        raise GenerationError(f"{path}: no prompt in it (one per line)")
    return texts


def run(args) -> int:
    from dataclasses import asdict

    from cascade_mega.inference.load import load_decoder

    if args.prompt is not None:
        texts = [args.prompt]
    else:
        texts = read_prompts(args.prompts_file)
    from cascade_mega.inference.decode import GenerationError, check_request

    try:
        policy = Policy(args.policy, args.steps, args.tau, args.order, args.bound, args.remask,
                        args.draft, args.redraft, args.verify)
        sampling = Sampling(greedy=not args.sample, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as err:
        raise GenerationError(str(err)) from None
    if args.max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads < 0:
        raise GenerationError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    given = {"cache": args.cache, "block": args.decode_block, "guidance": args.guidance}
    decoder = load_decoder(args.ckpt, args.threads, args.precision,
                           **{k: v for k, v in given.items() if v is not None})
    prompts = [decoder.net.tok.encode(t) for t in texts]
    check_request(prompts, decoder.max_len, args.max_new_tokens)  # before the prompt is echoed
    decoder.check_policy(policy)
    for i, p in enumerate(prompts):  # the context ends before the budget: said, not silent
        if len(p) + args.max_new_tokens > decoder.max_len:
            print(f"cascade: warning: prompt {i} has {len(p)} tokens: the context "
                  f"({decoder.max_len}) leaves room for at most {decoder.max_len - len(p)} of the "
                  f"{args.max_new_tokens} new tokens", file=sys.stderr)
    streaming = len(prompts) == 1 and not args.json
    shown = {"ids": [], "text": ""}

    def stream(i, tokens):  # print the text a decided block adds, as soon as it is decided
        shown["ids"] += tokens
        text = decoder.net.tok.decode(shown["ids"])
        sys.stdout.write(text[len(shown["text"]):])
        sys.stdout.flush()
        shown["text"] = text

    if streaming:
        sys.stdout.write(texts[0])
    start = time.perf_counter()
    results = decoder.generate(prompts, args.max_new_tokens, policy, sampling,
                               stream if streaming else None)
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.tokens) for r in results)
    for text, r in zip(texts, results):
        if args.json:
            print(json.dumps({"prompt": text, **asdict(r)}))
        elif not streaming:
            print(text + r.text, end="\n\n")
    if streaming:
        print()
    together = "one after the other" if hasattr(decoder, "cache_mode") else "in one batch"
    print(f"[{len(prompts)} prompt(s) {together}: {tokens} tokens, {decoder.forwards} forwards "
          f"({tokens / max(decoder.forwards, 1):.2f} tokens/forward), {tokens / elapsed:.1f} "
          f"tokens/s, policy {args.policy}]", file=sys.stderr)
    return 0
