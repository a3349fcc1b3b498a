"""Loss and perplexity-bound curves of a run as PNG, from `<run_dir>/metrics.jsonl`."""

from __future__ import annotations

import json
import os


def curves(metrics_path: str, out_dir: str) -> list[str]:
    """Writes loss.png and ppl_bound.png (train and validation); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):
        return []
    series: dict = {}
    with open(metrics_path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key in ("loss", "ppl_bound"):
                if key in rec:
                    series.setdefault((key, rec["split"]), {})[rec["step"]] = rec[key]
    written = []
    os.makedirs(out_dir, exist_ok=True)
    for key, label in (("loss", "loss (NELBO per token)"), ("ppl_bound", "perplexity bound")):
        lines = {split: pts for (k, split), pts in series.items() if k == key}
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for split, pts in sorted(lines.items()):
            steps = sorted(pts)
            ax.plot(steps, [pts[s] for s in steps], marker="o" if split == "valid" else None,
                    label=split)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if key == "ppl_bound":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{key}.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
