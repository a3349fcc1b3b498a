"""`cascade sweep fit`'s outputs: Markdown and CSV tables, PNG plots (in <root>/fit/).

- fit.md: the fitted law per objective with 95% bootstrap intervals and the compute multiplier to
  match AR at the sweep's largest budget, and a warning for a law with fewer than twice as many
  runs as parameters (also printed); the block-size table (same model and tokens, B from
  1 = AR to L); every run's loss; the failed runs with their reason.
- laws.csv, runs.csv: the same figures for other tools.
- loss_vs_compute.png: per objective, each run's loss against its FLOPs, the fitted L(N, D) of
  each swept size along its budgets, and the compute-optimal frontier with its 95% bootstrap
  band (the plot's budgets reach 30x past the largest run: the band shows how far to trust it).
- loss_vs_block_size.png: the perplexity bound against B for each (size, tokens) swept at
  several block sizes.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from typing import Dict, List

import numpy as np

from cascade_mega.sweep.fit import NAMES, Law, multiplier, reference_compute


def _g(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.4g}"


def block_groups(results: List[dict]) -> Dict[tuple, List[dict]]:
    """(depth, width, tokens, lr, experts, top-k) -> its runs, when swept at more than one
    block size."""
    groups = defaultdict(list)
    for r in results:
        groups[(r["depth"], r["width"], r["tokens"], r["lr"], r.get("experts", 0),
                r.get("top_k", 0))].append(r)
    return {k: sorted(v, key=_block) for k, v in groups.items()
            if len({r["label"] for r in v}) > 1}


def _block(r) -> int:
    return 1 if r["label"].split("_")[0] == "ar" else r["block_size"]


def write(folder: str, results: List[dict], failures: List[dict], laws: Dict[str, object],
          seq_len: int) -> List[str]:
    os.makedirs(folder, exist_ok=True)
    c_ref = reference_compute(results)
    ar = laws.get("ar") if isinstance(laws.get("ar"), Law) else None
    lines = ["# Sweep fit: L(N, D) = E + A / N^alpha + B / D^beta per objective", "",
             f"{len(results)} finished runs, {len(failures)} failed. Loss: final validation "
             "NELBO (nats/token; NLL for AR). N: non-embedding parameters; D: training tokens; "
             "95% bootstrap intervals in brackets.", ""]
    head = "| objective | runs | " + " | ".join(NAMES) + \
        f" | compute x to match AR at C = {_g(c_ref)} |"
    lines += [head, "|" + "---|" * (len(NAMES) + 3)]
    law_rows, warnings = [], []
    for label, law in laws.items():
        if not isinstance(law, Law):
            lines.append(f"| {label} | - | {law} |" + " |" * (len(NAMES) + 1))
            law_rows.append({"objective": label, "error": law})
            continue
        cells = [f"{_g(getattr(law, n))} [{_g(law.ci.get(n, (None,))[0])}, "
                 f"{_g(law.ci.get(n, (None, None))[1])}]" for n in NAMES]
        mult, ci = (None, None)
        if ar is not None and c_ref:
            mult, ci = (1.0, None) if label == "ar" else multiplier(law, ar, c_ref)
        mcell = _g(mult) + (f" [{_g(ci[0])}, {_g(ci[1])}]" if ci else "")
        lines.append(f"| {label} | {law.points} | " + " | ".join(cells) + f" | {mcell} |")
        if law.warning:
            warnings.append(f"{label}: {law.warning}")
        law_rows.append({"objective": label, "runs": law.points,
                         **{n: getattr(law, n) for n in NAMES},
                         **{f"{n}_low": law.ci.get(n, (None, None))[0] for n in NAMES},
                         **{f"{n}_high": law.ci.get(n, (None, None))[1] for n in NAMES},
                         "flops_per_token_k1": law.k1, "flops_per_token_k0": law.k0,
                         "compute_multiplier_vs_ar": mult,
                         "multiplier_low": ci[0] if ci else None,
                         "multiplier_high": ci[1] if ci else None, "reference_flops": c_ref})
    if warnings:
        lines += [""] + [f"Warning: {w}." for w in warnings]
    groups = block_groups(results)
    if groups:
        lines += ["", "## Block size (same model, same tokens)", "",
                  "| depth x width | tokens | B | objective | NELBO | ppl bound |",
                  "|---|---|---|---|---|---|"]
        for (depth, width, tokens, *_), rows in groups.items():
            for r in rows:
                B = "L" if r["label"].split("_")[0] == "mdlm" else _block(r)
                lines.append(f"| {depth} x {width} | {_g(float(tokens))} | {B} | {r['label']} "
                             f"| {r['loss']:.4f} | {math.exp(r['loss']):.2f} |")
    lines += ["", "## Runs", "", "| run | objective | N | D | FLOPs | NELBO | ppl bound |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["label"], r["flops"])):
        lines.append(f"| {r['run']} | {r['label']} | {_g(float(r['params']))} | "
                     f"{_g(float(r['tokens']))} | {_g(r['flops'])} | {r['loss']:.4f} | "
                     f"{math.exp(r['loss']):.2f} |")
    if failures:
        lines += ["", "## Failed runs (not in the fit)", "", "| run | reason |", "|---|---|"]
        lines += [f"| {f['run']} | {f['reason']} |" for f in failures]
    paths = [os.path.join(folder, n) for n in ("fit.md", "laws.csv", "runs.csv")]
    with open(paths[0], "w") as f:
        f.write("\n".join(lines) + "\n")
    _csv(paths[1], law_rows)
    _csv(paths[2], [{**r, "status": "finished"} for r in results] +
         [{**f, "status": "failed"} for f in failures])
    paths += _plots(folder, results, laws, seq_len)
    return paths


def _csv(path: str, rows: List[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _plots(folder: str, results: List[dict], laws: Dict[str, object], seq_len: int) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["label"] for r in results})
    out = []
    if labels:
        fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.6), sharey=True,
                                 squeeze=False)
        c_all = [r["flops"] for r in results]
        grid = np.logspace(math.log10(min(c_all) / 3), math.log10(max(c_all) * 30), 80)
        for ax, label in zip(axes[0], labels):
            rows = [r for r in results if r["label"] == label]
            sizes = sorted({r["params"] for r in rows})
            colours = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
            law = laws.get(label)
            for n, colour in zip(sizes, colours):
                pts = sorted((r["flops"], r["loss"]) for r in rows if r["params"] == n)
                ax.scatter(*zip(*pts), color=colour, s=18, label=f"N={n:.2g}")
                if isinstance(law, Law):
                    c = np.logspace(math.log10(pts[0][0] / 2), math.log10(pts[-1][0] * 4), 40)
                    ax.plot(c, law.loss(n, c / law.flops_per_token(n)), color=colour, lw=1)
            if isinstance(law, Law):
                ax.plot(grid, law.frontier(grid)[0], "k--", lw=1, label="frontier")
                band = law.frontier_band(grid)  # wide where it extrapolates past the runs
                if band is not None:
                    ax.fill_between(grid, *band, color="k", alpha=0.12, lw=0,
                                    label="frontier, 95% bootstrap")
            ax.set_xscale("log")
            ax.set_title(label)
            ax.set_xlabel("training FLOPs")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("final validation NELBO (nats/token)")
        fig.tight_layout()
        out.append(os.path.join(folder, "loss_vs_compute.png"))
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
    groups = block_groups(results)
    if groups:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for (depth, width, tokens, lr, experts, top_k), rows in groups.items():
            xs = [_block(r) for r in rows]
            moe = f", {experts} experts top {top_k}" if experts else ""
            ax.plot(xs, [math.exp(r["loss"]) for r in rows], "o-",
                    label=f"{depth}x{width}{moe}, {tokens:.2g} tokens")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"block size B (1 = AR, {seq_len} = L: full diffusion)")
        ax.set_ylabel("validation perplexity bound")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(os.path.join(folder, "loss_vs_block_size.png"))
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
    return out
