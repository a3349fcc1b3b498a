"""Compiled callables compile a counted, bounded number of times, and never fall back in silence.

A short bf16 training with FlexAttention (`model.attention_kernel=flex`) on the CPU: the training
forwards need gradients, which flex has not there, so they run the tiled kernel (one warning);
evaluation runs the compiled flex forward at each block size of the schedule, with document
masks (a new mask per micro-batch); then the checkpoint decodes three prompts of different
lengths through flex at fixed shapes. Each number below is a signature `kernels/flex.py`
names; megatron-core's fused bias-SwiGLU (`model.fusions=true`, torch.compile) is counted too.
"""

import warnings

import pytest
import torch

from cascade_mega.config import load_config

ARGS = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "data.seq_len=32", "diffusion.block_size=8", "diffusion.block_size_schedule={0: 4, 2: 8}",
        "data.document_mask=true", "train.steps=4", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_interval=1", "train.eval_batches=2",
        "optimizer.warmup_steps=1", "tracking.enabled=false", "checkpoint.interval=4",
        "model.attention_kernel=flex", "train.precision=bf16", "model.fusions=true"]


def test_compiles_per_callable_of_a_run(megatron, tmp_path):
    from cascade_kernels import flex
    from cascade_mega.inference import load_decoder
    from cascade_mega.inference.policies import Policy
    from cascade_mega.inference.sampling import Sampling
    from cascade_mega.model.attention import BlockDiffusionAttention, KernelWarning
    from cascade_mega.runtime import compilation
    from cascade_mega.train.trainer import Trainer

    torch._dynamo.reset()
    start, graphs = flex.compiles(), compilation.graphs()
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *ARGS])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg, []).setup().fit()
    assert [w for w in caught if issubclass(w.category, KernelWarning)
            and "training forwards there run the tiled kernel" in str(w.message)]
    # evaluation at steps 0-4 (at the decoding block size, 8, before and after the schedule's
    # change), two batches each and the common-target pass, a new document mask each: one
    # signature (training forwards at block sizes 4 then 8 run the tiled kernel here; on a GPU
    # they are two more, with gradients)
    assert flex.compiles() - start == 1

    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [19, 20, 21, 22, 23]]
    tokens = {}
    for precision in ("bf16", "fp32"):
        decoder = load_decoder(str(tmp_path / "run"), precision=precision)
        before = flex.compiles()
        out = decoder.generate(prompts, 20, Policy("fixed", steps=4), Sampling())
        # prefill and every step after it: 128 rows x (cache + 128) keys, one signature per dtype
        assert flex.compiles() - before == 1, precision
        tokens[precision] = [r.tokens for r in out]
        if precision == "fp32":  # the same tokens as SDPA under the dense decoding mask
            for m in decoder.net.model.modules():
                if isinstance(m, BlockDiffusionAttention):
                    m.kernel = "tiled"
            again = decoder.generate(prompts, 20, Policy("fixed", steps=4), Sampling())
            assert [r.tokens for r in again] == tokens["fp32"]
    assert all(len(t) == 20 for t in tokens["fp32"])
    assert flex.compiles() - start == 3
    # megatron-core's fused bias-SwiGLU (torch.compile, shape-dynamic after its first recompile):
    # training with gradients, evaluation without, decoding's first and later shapes in bf16,
    # and once in fp32
    assert compilation.graphs() - graphs - 3 == 5
    assert torch._dynamo.config.fail_on_recompile_limit_hit


def test_past_the_limit_is_an_error_naming_the_cause(megatron):
    """A signature past Dynamo's recompile limit stops with one message, instead of running
    flex uncompiled (a limit of 1 here; the run's is `compilation.RECOMPILE_LIMIT`)."""
    from cascade_kernels import flex
    from cascade_mega.diffusion.masks import AttentionLayout

    torch._dynamo.reset()
    flex._compiled()  # configured first, then the limit lowered for the test
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        for L in (16, 32):
            layout = AttentionLayout("block_diffusion", L, 4)
            q = torch.randn(1, 2, layout.total_len, 16)
            if L == 16:
                flex.attention(q, q, q, layout)
            else:
                with pytest.raises(flex.RecompileLimit, match="past its limit of 1"):
                    flex.attention(q, q, q, layout)
    torch._dynamo.reset()
