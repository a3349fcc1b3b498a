"""Loss and perplexity-bound curves (PNG, from `<run_dir>/metrics.jsonl`), written to
`<run_dir>/plots/` and handed to the tracker as artifacts, after each evaluation and at the
end."""

from __future__ import annotations

import os

from cascade_mega.train.callbacks.base import Callback


class LossPlots(Callback):
    def __init__(self, run_dir: str, sink):
        """sink: where the images go (`MlflowTracker.artifact(name, bytes)`)."""
        self.run_dir, self.sink = run_dir, sink

    def draw(self) -> None:
        from cascade_mega.tracking import plots

        out = os.path.join(self.run_dir, "plots")
        for path in plots.curves(os.path.join(self.run_dir, "metrics.jsonl"), out):
            with open(path, "rb") as f:
                self.sink.artifact(f"plots/{os.path.basename(path)}", f.read())

    def on_eval_end(self, trainer, step, metrics):
        self.draw()

    def on_train_end(self, trainer):
        self.draw()
