"""Checkpoints with megatron-core `dist_checkpointing`, crash-safe, verified, and loaded without
running code. Everything a caller needs is importable from here.

Layout under `<run_dir>/checkpoints/`: one folder per saved iteration (`iter_0000200/`) and a
`latest` file naming the newest complete one. A save writes into `iter_XXXXXXX.partial/`, all ranks
meet at a barrier, then rank 0 renames the folder and replaces `latest` atomically (write a temp
file, fsync, `os.replace`). A crash at any point leaves the previous `latest` valid; leftover
`.partial` folders are ignored and cleaned on the next save.

The model and optimizer are sharded state (loadable at another parallel layout); the step, the
learning-rate schedule and the consumed-sample count are common state. Noise and data order are
functions of (seed, step), so nothing else is needed for an exact resume.

The package's other modules: `manifest.py` (each checkpoint lists its files' sizes and checksums;
every reader verifies them), `safe_unpickle.py` (a load unpickles nothing that runs code),
`space.py` (the free space a save needs, checked before it writes; a disk that fills anyway is
named in one message) and `distopt_state.py` (megatron-core's distributed optimizer state at its parameters' own offsets).
It sits below the trainer (which saves and resumes through it) and the commands that read a
checkpoint (generate, convert, eval, a distillation teacher): it imports none of them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from cascade_mega.checkpoint import distopt_state
from cascade_mega.checkpoint import manifest as manifest_file
from cascade_mega.checkpoint import safe_unpickle, space
from cascade_mega.errors import UserError

LATEST = "latest"
INFO = "cascade.json"  # step, consumed samples and the layout a checkpoint was saved at


class CheckpointError(UserError, RuntimeError):
    """A checkpoint the run cannot use (missing, incomplete or damaged, of another model)."""


class RefusedCheckpoint(CheckpointError):
    """A checkpoint file that asks to run code on load (`safe_unpickle`)."""


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _unwrap(chunk):
    """The model inside megatron's DDP wrapper: checkpoint keys carry no 'module.' prefix."""
    return getattr(chunk, "module", chunk)


def sharded_state(chunks, optimizer, scheduler, step: int, consumed: int, is_loading=False):
    model_sd = {}
    for i, c in enumerate(chunks):
        model_sd[f"model{i}"] = _unwrap(c).sharded_state_dict()
    state = {**model_sd, "step": step, "consumed_samples": consumed,
             "num_model_chunks": len(chunks)}
    if optimizer is not None:
        # the optimizer finds each param's sharded tensor in the nested {model<i>: ...} dict
        flat = model_sd
        # fully_reshardable: the distributed optimizer's state loads at any other layout
        distopt_state.install()
        state["optimizer"] = optimizer.sharded_state_dict(
            flat, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        state["scheduler"] = scheduler.state_dict()
    return state


def start_writer() -> None:
    """megatron's checkpoint writer hands its results back through a queue that by default is a
    `multiprocessing.Manager` queue, served by a helper process it spawns at the first save: one
    more Python process per rank (~330 MB, seconds of CPU at start-up), which a scheduler's
    SIGTERM would kill mid-save and a kill -9 of the rank leaves behind. Saves here are
    synchronous (the writer runs in the rank's own process, `AsyncRequest.execute_sync`), so an
    in-process queue carries the same results, and no helper exists to lose or to leak."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def save(ckpt_root: str, chunks, optimizer, scheduler, step: int, consumed: int,
         keep_last: Optional[int] = None, write_extra=None, layout: Optional[dict] = None,
         config_yaml: Optional[str] = None, keep: tuple = (),
         block_size: Optional[int] = None) -> str:
    """write_extra(folder): every rank's own files (e.g. the DALI pipeline state), written into
    the checkpoint before it is declared complete. layout: the parallel layout it was saved at,
    recorded in `cascade.json` with the step (what `listing` returns). config_yaml: the run's
    config, kept as `config.yaml` (a resume names what changed since). keep: checkpoint folders
    `keep_last` never deletes (the one this run resumed from). block_size: the block size the
    weights were last trained at (a block-size schedule's phase), recorded in `cascade.json`."""
    final = os.path.join(ckpt_root, iter_name(step))
    partial = final + ".partial"
    if _rank0():
        os.makedirs(ckpt_root, exist_ok=True)
        for name in os.listdir(ckpt_root):
            if name.endswith(".partial"):
                shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    state = sharded_state(chunks, optimizer, scheduler, step, consumed)
    last = _newest(ckpt_root)
    need, free = space.check(ckpt_root, iter_name(step), state, last)  # before any write
    try:
        _write(ckpt_root, partial, final, state, step, consumed, keep_last, write_extra, layout,
               config_yaml, keep, block_size)
    except BaseException as err:  # torch's CheckpointException is not an Exception
        full = not isinstance(err, (KeyboardInterrupt, SystemExit)) and \
            space.is_full(err, ckpt_root)  # every rank: the writer's failure reaches all
        if _rank0():  # its space back: the run's closing writes still fit
            shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise space.OutOfSpace(space.message(iter_name(step), ckpt_root, free, need,
                                                 last)) from None
        raise
    return final


def _newest(ckpt_root: str) -> Optional[str]:
    try:
        return latest(ckpt_root)
    except CheckpointError:
        return None


def _write(ckpt_root, partial, final, state, step, consumed, keep_last, write_extra, layout,
           config_yaml, keep, block_size=None) -> None:
    if _rank0():
        os.makedirs(partial)
    _barrier()
    start_writer()
    dist_checkpointing.save(state, partial)
    if write_extra is not None:
        write_extra(partial)
    _barrier()
    if _rank0():
        if config_yaml is not None:
            with open(os.path.join(partial, "config.yaml"), "w") as f:
                f.write(config_yaml)
        with open(os.path.join(partial, INFO), "w") as f:
            info = {"step": step, "consumed_samples": consumed, "layout": layout or {},
                    "saved_at": time.time()}
            if block_size is not None:
                info["block_size"] = block_size
            json.dump(info, f)
        manifest_file.write(partial)  # the last file: what it lists is the whole checkpoint
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        _atomic_write(os.path.join(ckpt_root, LATEST), iter_name(step) + "\n")
        if keep_last:
            done = sorted(n for n in os.listdir(ckpt_root)
                          if n.startswith("iter_") and not n.endswith(".partial"))
            kept = {os.path.basename(os.path.normpath(k)) for k in keep if k}
            for old in done[:-keep_last]:
                if old not in kept:
                    shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    _barrier()


def listing(ckpt_root: str) -> list:
    """The complete checkpoints of a run, oldest first: path, step, layout, time saved."""
    out = []
    if not os.path.isdir(ckpt_root):
        return out
    for name in sorted(os.listdir(ckpt_root)):
        info = os.path.join(ckpt_root, name, INFO)
        if name.startswith("iter_") and not name.endswith(".partial") and os.path.isfile(info):
            with open(info) as f:
                out.append({"path": os.path.join(os.path.abspath(ckpt_root), name), **json.load(f)})
    return out


def latest(ckpt_root: str) -> Optional[str]:
    """The newest complete checkpoint folder, or None."""
    pointer = os.path.join(ckpt_root, LATEST)
    if not os.path.isfile(pointer):
        return None
    name = open(pointer).read().strip()
    path = os.path.join(ckpt_root, name)
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"{pointer} names {name}, which is not a complete checkpoint")
    return path


def resume_point(ckpt_root: str, on_corrupt: str = "fallback",
                 training: bool = True) -> Optional[str]:
    """The checkpoint a run resumes from: the one `latest` names, verified (`manifest.py`).
    A damaged one: the newest older one that verifies, with a warning naming both
    (`on_corrupt=fallback`), or one message (`stop`). `latest` missing while checkpoints exist:
    the newest that verifies, with a warning (never a silent restart). None: no checkpoint."""
    if not os.path.isdir(ckpt_root):
        return None
    names = sorted(n for n in os.listdir(ckpt_root)
                   if n.startswith("iter_") and not n.endswith(".partial")
                   and os.path.isdir(os.path.join(ckpt_root, n)))
    pointer = os.path.join(ckpt_root, LATEST)
    named = open(pointer).read().strip() if os.path.isfile(pointer) else None
    if named in names:
        names = names[:names.index(named) + 1]
    damaged = []
    for name in reversed(names):
        path = os.path.join(ckpt_root, name)
        problem = manifest_file.verify(path)
        if not problem:
            if damaged or named != name:
                if damaged:
                    why = "; ".join(f"{p} is damaged: {w}" for p, w in damaged)
                elif named is None:
                    why = f"{pointer} is missing"
                else:
                    why = f"{pointer} names {named}, which is not there"
                print(f"cascade: warning: {why}; resuming from {path}", file=sys.stderr,
                      flush=True)
            return path
        if on_corrupt == "stop":
            raise CheckpointError(f"checkpoint {path} is damaged: {problem} "
                                  "(checkpoint.on_corrupt=fallback resumes from the newest one "
                                  "that verifies)")
        damaged.append((path, problem))
    if damaged or named is not None:  # a run was here: never a silent restart
        what = f"{damaged[0][0]} is damaged: {damaged[0][1]}" if damaged else \
            f"{pointer} names {named}, which is not a complete checkpoint"
        hint = "; train.resume=none starts the run over from step 0" if training else ""
        raise CheckpointError(f"{what}, and no other checkpoint under {ckpt_root} verifies{hint}")
    return None


class _StepLess(dict):
    """A parameter's loaded tensors, where the per-parameter 'step' the loader asks for is None
    (megatron-core then skips it): the step comes from the common state."""

    def __missing__(self, key):
        return None


def _prepare_torch_adam(optimizer) -> None:
    """megatron-core's distributed optimizer over torch's Adam (no Apex or Transformer Engine,
    as on the CPU) cannot load its own checkpoints: building the loading template it reads each
    parameter's Adam step, which a fresh optimizer lacks; loading, it asks the checkpoint for a
    per-parameter 'step' tensor the fully reshardable format does not hold. So each parameter
    starts with zero moments and step 0 (all overwritten by the checkpoint), and the loader sees
    no tensor for 'step' (the common step restores it)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    # the step on the host on purpose: torch's (non-capturable) Adam keeps it
                    # there; the moments take the parameter's device
                    inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}
        setter = getattr(part, "_set_main_param_and_optimizer_states", None)
        if setter is not None and not getattr(setter, "_step_less", False):
            def set_states(model_param, tensors, _set=setter):
                return _set(model_param, _StepLess(tensors))
            set_states._step_less = True
            part._set_main_param_and_optimizer_states = set_states


def _unshare_steps(optimizer) -> None:
    """megatron-core's distributed optimizer restores torch's Adam with one step tensor shared
    by every parameter, which torch's multi-tensor Adam then increments once per parameter
    (bias correction far ahead of the step): each parameter gets its own copy."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for state in inner.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()


# what identifies a parameter group across a save and a load (megatron-core's structural keys;
# its own identifier also holds the learning rates and weight decays, which a resume may change)
GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr", "optimizer")
# what a resume may change in a group (never its state: the distributed optimizer keeps Adam's
# step in the group itself)
HYPERPARAMETERS = ("lr", "max_lr", "min_lr", "start_wd", "end_wd", "weight_decay", "betas",
                   "eps")


def _current_hyperparameters(saved, optimizer, path: str) -> None:
    """The saved parameter groups take the live optimizer's hyperparameters (`HYPERPARAMETERS`:
    learning rates, weight decay, Adam's betas and eps, the config in force), matched by their
    structural keys; the saved state keeps its moments and steps (a group's own `step` too). A saved group with no live counterpart is a
    change of the optimizer's structure, which a resume cannot honour: one message."""
    live = [g for part in getattr(optimizer, "chained_optimizers", [optimizer])
            for g in getattr(getattr(part, "optimizer", None), "param_groups", [])]
    by_key = {tuple(g.get(k) for k in GROUP_KEYS): g for g in live}

    def visit(node):
        if isinstance(node, dict):
            groups = node.get("param_groups")
            if isinstance(groups, list) and all(isinstance(g, dict) for g in groups):
                for group in groups:
                    key = tuple(group.get(k) for k in GROUP_KEYS)
                    if key not in by_key:
                        raise CheckpointError(
                            f"cannot resume {path} with this optimizer: its parameter group "
                            f"{dict(zip(GROUP_KEYS, key))} has no counterpart here (the "
                            "optimizer or its parameter grouping changed; learning rates, "
                            "weight decay, betas and clipping may change on resume)")
                    group.update({k: by_key[key][k] for k in HYPERPARAMETERS
                                  if k in by_key[key]})
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(saved)


def load(path: str, chunks, optimizer, scheduler):
    """Load into the live model/optimizer; returns (step, consumed_samples)."""
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"{path} is not a complete checkpoint (no metadata.json)")
    if optimizer is not None:
        _prepare_torch_adam(optimizer)
    template = sharded_state(chunks, optimizer, scheduler, 0, 0, is_loading=True)
    safe_unpickle.install()  # nothing a checkpoint file holds runs code
    safe_unpickle.refusals.clear()
    try:
        state = dist_checkpointing.load(template, path)
    except (Exception, CheckpointException) as err:  # torch's is a BaseException
        if safe_unpickle.refusals:
            raise RefusedCheckpoint(f"refusing checkpoint {path}: "
                                    f"{safe_unpickle.refusals[0]}") from None
        reason = str(err).strip().splitlines()[-1]  # the innermost cause, not its traceback
        raise CheckpointError(f"cannot load checkpoint {path}: {reason}") from None
    for i, c in enumerate(chunks):
        _unwrap(c).load_state_dict(state[f"model{i}"])
    if optimizer is not None:
        _current_hyperparameters(state["optimizer"], optimizer, path)
        optimizer.load_state_dict(state["optimizer"])
        _unshare_steps(optimizer)
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), int(state["consumed_samples"])


def check_architecture(path: str, cfg, what: str) -> None:
    """Refuse, before any model is built, a checkpoint whose saved config (`config.yaml` in the
    checkpoint) shapes the weights differently from `cfg` (an MoE checkpoint into a dense
    model, other sizes): one message naming each differing key."""
    from cascade_mega.config import config_changes, weight_keys

    saved = os.path.join(path, "config.yaml")
    if not os.path.isfile(saved):
        return
    shaping = weight_keys()  # the fields marked `weights` in config/sections.py
    changes = [c for c in config_changes(open(saved).read(), cfg) if c[0] in shaping]
    if changes:
        def show(v):
            return "null" if v is None else v
        listed = "; ".join(f"'{k}' = {show(old)} there, {show(new)} here"
                           for k, old, new in changes)
        raise CheckpointError(f"{what} {path} holds another model ({listed}): its weights do "
                              "not fit this config")


def verify(path: str) -> None:
    """Refuse a checkpoint folder whose files are not the ones saved, with one message."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    problem = manifest_file.verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")


def locate(path: str) -> tuple[str, str]:
    """(config.yaml, checkpoint folder) for a run directory or one of its checkpoints, verified
    as a resume verifies (`manifest.py`): for a run directory, the newest checkpoint that verifies
    (a damaged newer one is named in a warning); a checkpoint folder named explicitly must verify
    itself. Every command that reads a checkpoint (generate, convert, eval, init_from, a teacher)
    comes through here, so none of them loads damaged weights."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if os.path.isfile(os.path.join(path, "metadata.json")) or \
            os.path.isfile(os.path.join(path, manifest_file.NAME)):  # a checkpoint folder
        config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))),
                              "config.yaml")
        if not os.path.isfile(config):
            raise CheckpointError(f"{path}: no config.yaml in its run directory ({config})")
        verify(path)
        return config, path
    if os.path.isdir(os.path.join(path, "checkpoints")) or \
            os.path.isfile(os.path.join(path, "config.yaml")):
        ckpt = resume_point(os.path.join(path, "checkpoints"), training=False)
        if ckpt is None:
            raise CheckpointError(f"{path}: the run has no complete checkpoint yet")
        return os.path.join(path, "config.yaml"), ckpt
    raise CheckpointError(f"{path} is neither a run directory nor a complete checkpoint")
