"""megatron-core DDP wrapper, optimizer (AdamW) and warmup + decay schedule for one run.

The config in force is the schedule's, also on resume (megatron-core's
`override_opt_param_scheduler`, Megatron-LM's `--override-opt_param-scheduler`): a run resumed
with another learning rate, minimum, warmup, decay style or length (`train.steps`), weight decay
or clipping continues on the new schedule from the checkpoint's step (what LLaDA did to survive
a loss spike: the learning rate cut on resume). The checkpoint's optimizer state keeps its
moments; its parameter groups take the config's values (`checkpoint.load`).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def overlap(cfg) -> tuple[bool, bool]:
    """(gradient reduce, parameter gather) overlapped with compute: the config's, or on a GPU
    (the gather needs the distributed optimizer)."""
    from cascade_mega.runtime import device

    p = cfg.parallel
    grads = device.on_gpu() if p.overlap_grad_reduce is None else p.overlap_grad_reduce
    params = (p.distributed_optimizer and device.on_gpu()) if p.overlap_param_gather is None \
        else p.overlap_param_gather
    return grads or params, params  # megatron overlaps the gather only with the reduce


def wrap_ddp(chunks, cfg):
    grads, params = overlap(cfg)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=grads,
        overlap_param_gather=params,
        align_param_gather=params and len(chunks) > 1,
        bucket_size=cfg.parallel.bucket_size,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c,
                                disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    # The schedules read these from the first chunk's config: with virtual pipeline stages they
    # must cover every chunk (one function per chunk).
    def one_or_list(fns):
        return fns if len(wrapped) > 1 else fns[0]

    for w in wrapped:
        w.config.finalize_model_grads_func = finalize_model_grads
        w.config.no_sync_func = one_or_list([c.no_sync for c in wrapped])
        # with overlap, the pipeline schedules start each chunk's reduce (and the next forward's
        # parameter gather) themselves, as Megatron-LM's training loop sets them
        w.config.grad_sync_func = one_or_list([c.start_grad_sync for c in wrapped]) \
            if grads else None
        w.config.param_sync_func = one_or_list([c.start_param_sync for c in wrapped]) \
            if params and len(wrapped) > 1 else None
    return wrapped


@contextlib.contextmanager
def param_gather_paused(chunks):
    """For reading the whole weights (a checkpoint save): with the parameter gather overlapped,
    the weights are all-gathered first and the forward pre-hooks come back after."""
    hooked = [c for c in chunks if getattr(c, "use_forward_hook", False)]
    for c in hooked:
        c.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for c in hooked:
            c.enable_forward_pre_hook()


def build_optimizer(chunks, cfg, dtype):
    o = cfg.optimizer
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = refuse_nonfinite_updates(get_megatron_optimizer(opt_cfg, chunks))
    steps = cfg.train.steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(steps, 1),
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(steps, 1),
        wd_incr_style="constant",
        override_opt_param_scheduler=True,  # on resume, this config's values, not the saved
        use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def refuse_nonfinite_updates(optimizer):
    """An update whose gradient norm is NaN or Inf (a non-finite loss, an overflow) is not
    applied: megatron-core's `step()` then returns (False, norm, ...), and the trainer stops or
    skips the step (`train.nonfinite`). The norm is the one megatron computes for clipping, so
    the check costs nothing (it is on the host already)."""
    import math

    norm, apply = optimizer.get_grad_norm, optimizer.step_with_ready_grads

    def get_grad_norm():
        optimizer.last_grad_norm = norm()
        return optimizer.last_grad_norm

    def step_with_ready_grads():
        return math.isfinite(getattr(optimizer, "last_grad_norm", 0.0)) and apply()

    optimizer.get_grad_norm, optimizer.step_with_ready_grads = get_grad_norm, step_with_ready_grads
    return optimizer
