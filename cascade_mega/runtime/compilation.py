"""torch.compile in a run: a deliberate recompile limit, and no silent fallback past it.

Dynamo compiles a function again for each new signature (shapes, dtype, grad mode, constants),
and past `torch._dynamo.config.recompile_limit` (8) it runs the function uncompiled for the rest
of the process with no more than a log line: uncompiled FlexAttention materialises the whole
score matrix, so a run would slow down and grow in memory without a word. The compiled callables
here are FlexAttention (`kernels/flex.py`, which counts its own compiles and states its bound)
and megatron-core's fused kernels (`model.fusions`: bias-SwiGLU through its `jit_fuser`, which
Dynamo makes shape-dynamic after their first recompile). `configure()`, called by the one model
builder, raises the limit to `RECOMPILE_LIMIT`, above what those bounds add up to, and makes
reaching it an error that names the function (`fail_on_recompile_limit_hit`).
"""

from __future__ import annotations

# deliberately above Dynamo's default of 8: FlexAttention's bound for a block-size schedule of up
# to six sizes with and without documents, plus decoding's row buckets (kernels/flex.py)
RECOMPILE_LIMIT = 32


def configure() -> None:
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.fail_on_recompile_limit_hit = True


def graphs() -> int:
    """Graphs Dynamo has compiled in this process, every compiled callable together."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
