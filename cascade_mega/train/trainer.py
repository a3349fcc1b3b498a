"""The training loop: set-up in dependency order, then steps, evaluation and checkpoints.

Order matters for failing early: config (already validated) -> data (files, tokenizer, vocabulary)
-> process groups -> model -> optimizer -> resume. Everything that can be wrong with the user's
input is found before the model is built.

A step is data -> the objective's micro-batches (`diffusion/base.py`: schedule, noise, batch
preparation, the forward step and the named metrics are the objective's) -> megatron-core's
forward-backward schedule over them (gradient accumulation, pipeline schedules) -> the optimizer
step (clipping inside) and the LR schedule -> the objective's metrics. The loss is a
sum over tokens; megatron divides the gradients by the global token count
(`calculate_per_token_loss`), so the update does not depend on how the batch is split.

`fit` reads top to bottom: the loop steps, logs, evaluates and decides when to leave; everything
else around it is a callback (`callbacks/base.py`: the hooks, when they run, on which ranks). The
trainer's own components are installed first, always (`callbacks.builtin`: the exit record,
heartbeats, the schedule search, the profiler, the memory report, checkpoints), then the
callbacks the caller passes. The reader training draws from is the data layer's choice
(`data/train_reader.py`); checkpoints are `cascade_mega/checkpoint/`'s.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from cascade_mega import checkpoint
from cascade_mega.diffusion import flops
from cascade_mega.config import (CascadeConfig, config_changes, record_yaml, run_dtype,
                                 validate)
from cascade_mega.data import loader, train_reader
from cascade_mega.diffusion import distill, objectives
from cascade_mega.diffusion.base import Shard
from cascade_mega.model import moe
from cascade_mega.model.gpt import build_chunks, parameter_counts
from cascade_mega.runtime import device, distributed, machine, provenance, te_support
from cascade_mega.train import attempts
from cascade_mega.train.callbacks import builtin
from cascade_mega.train.errors import NonFiniteError
from cascade_mega.train.optim import build_optimizer, wrap_ddp
from cascade_mega.train.run_lock import RunLock
from cascade_mega.train.signals import StopSignals


def memory_gb() -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's resident memory, in GiB."""
    if device.on_gpu():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class Trainer:
    def __init__(self, cfg: CascadeConfig, callbacks=None):
        """callbacks: run after the trainer's own components (`callbacks.builtin`)."""
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.callbacks = builtin() + list(callbacks or [])
        self.start_step = 0
        self.step = 0

    # ---------------------------------------------------------------- set-up
    def setup(self):
        env = distributed.read_env()
        # one trainer per run directory (rank 0 holds it), before anything is written there
        self.lock = RunLock(self.run_dir, self.cfg.train.heartbeat_s,
                            6 * self.cfg.train.heartbeat_s).acquire() if env.rank == 0 else None
        try:
            return self._setup(env)
        except BaseException:
            self.release_lock()
            raise

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _setup(self, env):
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.world_size = env.world_size
        validate(cfg, env.world_size)  # a no-op for a config `load_config` checked already
        self.code_dir = provenance.check_running()  # a job's frozen code, not the checkout's
        device.select(env.local_rank)  # before anything (TE's import) can touch a GPU
        machine.check(cfg)  # TE for FP8, DALI: probed here, where the job runs
        # the builtin dataset is built once, by rank 0, while the others wait in the rendezvous
        self.prefix = loader.resolve_path(cfg.data.path) if env.rank == 0 else None
        distributed.init(cfg.parallel, cfg.train.seed)
        if env.world_size > 1:
            box = [self.prefix]
            dist.broadcast_object_list(box, src=0)
            self.prefix = box[0]
        self.tokenizer = loader.load_tokenizer(cfg.data, self.prefix)
        teacher = distill.teacher_config(cfg, self.tokenizer) if cfg.distill.teacher else None
        ps = parallel_state
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.context = (ps.get_context_parallel_rank(), ps.get_context_parallel_world_size())
        self.is_logger = (ps.is_pipeline_last_stage(ignore_virtual=True)
                          and ps.get_tensor_model_parallel_rank() == 0 and self.dp_rank == 0
                          and self.context[0] == 0)
        self.train_data, self.valid_data = loader.build_splits(
            cfg, self.tokenizer, self.prefix, self.dp_size)
        self.train_split = (self.train_data.documents, self.train_data.tokens)
        self.num_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp_size)
        self.dtype = run_dtype(cfg)
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self._find_checkpoint()  # a checkpoint of another model is refused before building
        self.chunks = wrap_ddp(build_chunks(cfg, self.tokenizer, self.dtype), cfg)
        self.parameters = parameter_counts(self.chunks)  # (total, without embeddings)
        self.teacher = distill.build_teacher(*teacher, self.tokenizer, self.dtype) \
            if teacher else None
        self.objective = objectives.build(
            cfg, self.tokenizer, Shard(self.dp_rank, self.dp_size, self.num_micro, self.context),
            self.teacher)
        if cfg.parallel.tp_comm_overlap:  # TE's userbuffers, before the first forward uses them
            te_support.init_userbuffers(cfg, self.objective.rows(cfg, True))
        self.optimizer, self.scheduler = build_optimizer(self.chunks, cfg, self.dtype)
        checkpoint.start_writer()
        self.peak_flops = flops.peak_flops()
        self.teacher_cfg = teacher[0] if teacher else None
        self._resume()
        self.train_data = train_reader.build(cfg, self.train_data, self.dp_rank, self.dp_size,
                                             self.num_micro, self.start_step, dist.get_rank(),
                                             self.resumed_from)
        if dist.get_rank() == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(record_yaml(cfg))
            loader.keep_with_run(self.tokenizer, self.prefix, self.run_dir)
        return self

    def _find_checkpoint(self):
        """What `_resume` loads: this run's checkpoint (`train.resume`), else the weights of
        `train.init_from`; either checked against the model this config builds."""
        mode, cfg = self.cfg.train.resume, self.cfg
        path = self._verified_resume_point() if mode == "auto" else \
            None if mode == "none" else mode
        self.resumed_from, self.resume_changes, self.init_path = path, [], None
        if not path:  # a start from step 0: a new attempt (`attempts.py`)
            moved = attempts.archive(self.run_dir) if dist.get_rank() == 0 else None
            if moved:
                print(f"this run starts from step 0: the earlier attempt's checkpoints, metrics "
                      f"and MLflow run are kept in {moved}", flush=True)
            if self.world_size > 1:
                dist.barrier()  # moved before any rank writes this attempt's files
        if path:
            if mode != "auto":  # a checkpoint named explicitly must verify itself
                checkpoint.verify(path)
            checkpoint.check_architecture(path, cfg, "the checkpoint to resume,")
        elif cfg.train.init_from:
            self.init_path = checkpoint.locate(cfg.train.init_from)[1]
            checkpoint.check_architecture(self.init_path, cfg, "'train.init_from' =")

    def _verified_resume_point(self):
        """`checkpoint.resume_point`, verified by rank 0 alone (it reads every file once) and
        given to the other ranks, a refusal included."""
        found = [None, None]
        if dist.get_rank() == 0:
            try:
                found[0] = checkpoint.resume_point(self.ckpt_root, self.cfg.checkpoint.on_corrupt)
            except checkpoint.CheckpointError as err:
                found[1] = str(err)
        if self.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        if found[1]:
            raise checkpoint.CheckpointError(found[1])
        return found[0]

    def _resume(self):
        path = self.resumed_from
        if path:
            self.start_step, _ = checkpoint.load(path, self.chunks, self.optimizer, self.scheduler)
            saved = os.path.join(path, "config.yaml")
            if os.path.isfile(saved):  # the config it was saved under
                self.resume_changes = config_changes(open(saved).read(), self.cfg)
        elif self.init_path:  # weights only; megatron's bf16 optimizer keeps fp32 copies:
            checkpoint.load(self.init_path, self.chunks, None, None)  # refresh them
            self.optimizer.reload_model_params()
        self.step = self.start_step
        self.emit("on_resume")  # e.g. the schedule search's last choice before this step

    # ---------------------------------------------------------------- steps
    def run_schedule(self, batch, forward_only: bool):
        """One step's micro-batches (`StepBatch`) through megatron-core's schedule; returns the
        objective's packed sums, added over micro-batches and ranks (on the device). Public:
        what measures the model between steps (evaluation, the schedule search) runs it too."""
        chunks = len(self.chunks)
        outs = get_forward_backward_func()(
            forward_step_func=self.objective.forward_step,
            # one iterator per model chunk: the interleaved schedule draws each micro-batch once
            # per virtual stage
            data_iterator=batch.make() if chunks == 1 else [batch.make() for _ in self.chunks],
            model=self.chunks if chunks > 1 else self.chunks[0],
            num_microbatches=self.num_micro,
            seq_length=batch.rows,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )
        sums = self.objective.zero_sums(device.current())
        for out in outs:
            sums += out["sums"]
        # context-parallel ranks hold parts of the same sequences: their sums add up too
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
                self.dp_size * self.context[1] > 1:
            dist.all_reduce(sums, group=parallel_state.get_data_parallel_group(
                with_context_parallel=True))
        return sums

    def _metrics(self, sums, train: bool) -> dict:
        """The sums read back once (one device-to-host copy), as the objective's named metrics."""
        return self.objective.metrics(self.objective.Sums.unpack(sums.cpu().tolist()), train)

    def train_step(self, step: int, log: bool = True) -> dict:
        """One optimizer step. log=False leaves the loss statistics on the device (no read-back:
        the step's only host synchronisation is megatron's gradient-norm clipping)."""
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        start = time.perf_counter()
        batch = self.objective.batch(self.train_data, step, "train")
        sums = self.run_schedule(batch, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:  # a refused update (non-finite gradients) leaves the LR schedule where it was
            self.scheduler.step(increment=1)
        elapsed = time.perf_counter() - start
        metrics = self._metrics(sums, train=True) if log else {}
        if log and self.cfg.model.moe.enabled:  # the expert load since the last logged step
            metrics.update(moe.step_metrics(self.chunks, self.cfg))
        if batch.block_size is not None:
            metrics["block_size"] = batch.block_size
        if not ok:
            metrics["skipped"] = 1.0
        metrics.update({
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "step_time": elapsed,
            "tokens_per_s": self.cfg.train.global_batch_size * self.cfg.data.seq_len / elapsed,
            "memory_gb": memory_gb(),
        })
        if self.peak_flops:  # GPU: model FLOPs utilisation per GPU (diffusion/flops.py counting)
            step_flops = flops.step_flops(batch.cfg,
                                          self.tokenizer.vocab_size, self.teacher_cfg)
            metrics["mfu"] = step_flops / elapsed / self.world_size / self.peak_flops
        return metrics

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """NELBO on a fixed validation set with fixed noise (t over (t_floor, 1]), then the
        objective's further passes, each logged with its suffix (`Objective.validation_passes`:
        the bound on the targets every objective shares, `nelbo_common`; a score-entropy run's
        cross-entropy-only bound, `nelbo_ce`)."""
        for c in self.chunks:
            c.eval()

        def run(split):
            sums = self.objective.zero_sums(device.current())
            for i in range(self.cfg.train.eval_batches):
                sums += self.run_schedule(self.objective.batch(self.valid_data, i, split),
                                           forward_only=True)
            return self._metrics(sums, train=False)

        metrics = run("valid")
        for split in self.objective.validation_passes():
            extra = run(split)
            metrics.update({f"{k}_{split}": extra[k] for k in ("nelbo", "ppl_bound")})
        return metrics

    # ---------------------------------------------------------------- loop
    def fit(self):
        """Train to `train.steps` (or `train.exit_interval` steps of this job, or until the
        scheduler signals: `signals.py`). `self.outcome` is 'finished', 'stopped' (left early,
        to be resumed; `self.stop_signal` names the signal) or 'failed' when the callbacks see
        the end; whatever happens, they all close, and the run lock is released."""
        t = self.cfg.train
        self.outcome, self.stop_signal, self.leaving = "failed", None, False
        signals = StopSignals().install()
        ended = False
        try:
            self.emit("on_train_start")
            if self.step == 0 < t.steps and self._eval_due():
                self.emit("on_eval_end", self.step, self.evaluate(self.step))
            while self.step < t.steps and not self.leaving:
                self._fit_step(signals)
            self.outcome = "finished" if self.step >= t.steps else "stopped"
            ended = True
        finally:
            try:  # a late signal (the tracking flush) is ignored; after a failure, what fails
                self._end(raise_first=ended)  # in closing is a warning, not a new error
            finally:
                signals.restore()
                self.release_lock()
        return self

    def _fit_step(self, signals) -> None:
        """One step of `fit`, with its hooks: pre_step (what it returns is logged with the
        step), the step, post_step, the finiteness check, on_step_end when logged, an evaluation
        when due, the stop decision every rank agrees on, on_step_boundary (checkpoints)."""
        t = self.cfg.train
        extra = {}
        for got in self.emit("pre_step", self.step):  # the schedule search's choice
            extra.update(got or {})
        log = (self.step + 1) % t.log_interval == 0 or self.step + 1 == t.steps or bool(extra)
        metrics = {**self.train_step(self.step, log), **extra}
        self.step += 1
        self.emit("post_step", self.step, metrics)
        self._check_finite(metrics)
        if log:
            self.emit("on_step_end", self.step, metrics)
        if self._eval_due():
            self.emit("on_eval_end", self.step, self.evaluate(self.step))
        self.stop_signal = signals.agreed()  # the scheduler's warning or preemption
        self.leaving = bool(self.stop_signal) or bool(t.exit_interval) and \
            (self.step - self.start_step) % t.exit_interval == 0
        self.emit("on_step_boundary", self.step)

    def _eval_due(self) -> bool:
        t = self.cfg.train
        return bool(t.eval_batches and t.eval_interval) and (
            self.step % t.eval_interval == 0 or self.step == t.steps)

    def _here(self) -> list:
        """The callbacks that run on this rank (`callbacks/base.py`), in list order."""
        return [cb for cb in self.callbacks if getattr(cb, "every_rank", False) or self.is_logger]

    def emit(self, hook: str, *args) -> list:
        """Call `hook` of every callback that runs on this rank, in list order; what they
        return. Public: a callback emits what it completes (the checkpointer,
        `on_checkpoint_end`)."""
        return [fn(self, *args) for cb in self._here() if (fn := getattr(cb, hook, None))]

    def _end(self, raise_first: bool = True) -> None:
        """Every callback's `close`, last installed first, then every `on_train_end`, in list
        order; each runs even when one before it raised, and the first error is raised after.
        After the run failed (`raise_first` false) each such error is one warning line: the
        run's own error is the one to report."""
        here, first = self._here(), None
        calls = [(cb, "close") for cb in reversed(here)] + [(cb, "on_train_end") for cb in here]
        for cb, hook in calls:
            try:
                getattr(cb, hook, lambda trainer: None)(self)
            except BaseException as err:  # noqa: BLE001  raised below, once all have run
                first = first or err
                if not raise_first:
                    print(f"cascade: warning: {type(cb).__name__}.{hook} after the failure: "
                          f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        if first is not None and raise_first:
            raise first

    def _check_finite(self, metrics: dict) -> None:
        """A step whose update was refused (NaN / Inf gradients, `optim.py`; every rank sees the
        same all-reduced norm, so all decide alike): stop with one message, or skip it
        (`train.nonfinite`)."""
        if "skipped" not in metrics:
            return
        what = f"step {self.step}: the loss or the gradients are not finite (grad_norm " \
            f"{metrics['grad_norm']})"
        if self.cfg.train.nonfinite == "skip":
            if dist.get_rank() == 0:
                print(f"cascade: warning: {what}; the update was not applied, training goes on "
                      "(train.nonfinite = skip)", flush=True)
            return
        last = checkpoint.latest(self.ckpt_root)
        raise NonFiniteError(f"{what}; the update was not applied and the run stops. The last "
                             f"good checkpoint is {last or 'none (no checkpoint yet)'}; "
                             "train.nonfinite=skip steps over such steps")

    def layout(self) -> dict:
        ps = parallel_state
        return {"tensor": ps.get_tensor_model_parallel_world_size(),
                "pipeline": ps.get_pipeline_model_parallel_world_size(),
                "context": self.context[1], "data": self.dp_size, "world_size": self.world_size,
                "expert": ps.get_expert_model_parallel_world_size(),
                "expert_tensor": ps.get_expert_tensor_parallel_world_size()}
