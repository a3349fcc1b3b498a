"""What `cascade submit` checks about the allocation before `sbatch`: each check is one message.

- the time limit fits start-up plus one checkpoint interval before the warning signal;
- the warning lead fits the step in flight plus a checkpoint save (the ranks checkpoint at the
  next step after USR1); a save longer than Slurm's kill wait after SIGTERM (preemption) is
  named as a warning: the save is atomic, so a killed one costs the steps since the last one;
- in a container, every path the job touches (run directory, working directory, frozen code,
  datasets, tokenizer, initial weights, teacher, file-based tracking store) lies inside the
  profile's mounts at the same path.

Times come from the profile's throughput figures (`device_tflops` x `assumed_mfu` for a step,
`checkpoint_write_gbps` for a save); the data's vocabulary, where the dataset is not readable
from the submitting host, from a typical one.
"""

from __future__ import annotations

import os

from cascade_mega.config import ConfigError
from cascade_mega.slurm.profile import ClusterProfile, seconds


def dataset_vocab(cfg) -> int:
    from cascade_mega.data import loader
    from cascade_mega.data.indexed import DataError

    try:
        return loader.load_tokenizer(cfg.data, loader.resolve_path(cfg.data.path)).vocab_size
    except (DataError, OSError):
        return 32_000  # the dataset is not readable from here: a typical vocabulary


def step_seconds(cfg, vocab: int, profile: ClusterProfile, devices: int) -> float:
    from cascade_mega.diffusion.flops import step_flops

    return step_flops(cfg, vocab) / (devices * profile.device_tflops * 1e12 * profile.assumed_mfu)


def checkpoint_bytes(cfg, vocab: int, on_gpu: bool) -> int:
    """Model weights in the run's precision, plus the fp32 main weights (under bf16) and Adam's
    two fp32 moments: 14 bytes a parameter in bf16, 12 in fp32."""
    from cascade_mega.plan import stage_parameters

    par = cfg.parallel
    params = 0
    for i in range(par.pipeline):  # a stage's dense weights over TP, its experts' over ETP x EP
        dense, experts = stage_parameters(cfg, vocab, i == 0, i == par.pipeline - 1)
        params += par.tensor * dense + (par.expert_tensor or par.tensor) * par.expert * experts
    fp32 = cfg.train.precision == "fp32" or (cfg.train.precision == "auto" and not on_gpu)
    return params * (12 if fp32 else 14)


def check_times(cfg, profile: ClusterProfile, res) -> list:
    """Refuse a time limit or warning lead too short; return warnings (one line each)."""
    devices = res.nodes * res.tasks_per_node
    time_limit = res.time
    vocab = cfg.model.vocab_size or dataset_vocab(cfg)
    step_s = step_seconds(cfg, vocab, profile, devices)
    steps = min(cfg.checkpoint.interval, cfg.train.steps)
    need = profile.startup_s + steps * step_s
    have = seconds(time_limit) - profile.signal_lead_s
    if have < need:
        raise ConfigError(
            f"time limit {time_limit} leaves {have} s before the warning signal, but start-up "
            f"({profile.startup_s} s) and one checkpoint interval ({steps} steps x ~{step_s:.2f} s "
            f"at {profile.device_tflops:g} TFLOP/s x MFU {profile.assumed_mfu:g} on {devices} "
            f"devices) need ~{need:.0f} s: raise --time or lower checkpoint.interval")
    size = checkpoint_bytes(cfg, vocab, res.gpus_per_node > 0)
    save_s = size / (profile.checkpoint_write_gbps * 1e9)
    if profile.signal_lead_s < step_s + save_s:
        raise ConfigError(
            f"signal_lead_s {profile.signal_lead_s} s of profile {profile.name!r} is shorter than "
            f"one step (~{step_s:.0f} s) plus a checkpoint save (~{save_s:.0f} s for "
            f"{size / 1e9:.1f} GB at {profile.checkpoint_write_gbps:g} GB/s): "
            "raise signal_lead_s in the profile")
    if profile.kill_wait_s and save_s > profile.kill_wait_s:
        return [f"warning: a checkpoint save (~{save_s:.0f} s) outlasts Slurm's kill wait "
                f"({profile.kill_wait_s} s) after a preemption's SIGTERM: a preempted job keeps "
                "the previous checkpoint (saves are atomic) and loses the steps since"]
    return []


def _mounts(profile: ClusterProfile) -> list:
    """(host path, container path) of each `SRC[:DST[:FLAGS]]` mount."""
    out = []
    for spec in profile.container_mounts:
        parts = spec.split(":")
        out.append((os.path.abspath(parts[0]), os.path.abspath(parts[1] if len(parts) > 1
                                                               else parts[0])))
    return out


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def job_paths(cfg, run_dir: str, code_dir: str) -> list:
    """(what, absolute path) of everything the job reads or writes from the shared file system."""
    from cascade_mega.data import loader
    from cascade_mega.data import shakespeare

    paths = [("the run directory", run_dir), ("the working directory", os.getcwd()),
             ("the code", code_dir)]
    if cfg.data.path == "builtin:shakespeare":
        paths.append(("the built-in dataset's cache", shakespeare.data_home()))
    else:
        paths += [("the dataset", p) for p in loader.blend(cfg.data.path)[0]]
    for what, value in (("data.tokenizer", cfg.data.tokenizer),
                        ("data.cache_dir", cfg.data.cache_dir),
                        ("train.init_from", cfg.train.init_from),
                        ("distill.teacher", cfg.distill.teacher)):
        if value:
            paths.append((what, value))
    uri = cfg.tracking.uri or ""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            paths.append(("tracking.uri", uri[len(scheme) - 1 if scheme == "sqlite:///" else
                                              len(scheme):]))
    return [(what, os.path.abspath(p)) for what, p in paths]


def check_mounts(profile: ClusterProfile, paths: list) -> None:
    """In a container, each path must be mounted at the same path (the job names them so)."""
    if not profile.container_image:
        return
    mounts = _mounts(profile)
    for what, path in paths:
        if not any(_inside(path, src) and src == dst for src, dst in mounts):
            shown = ", ".join(profile.container_mounts) or "none"
            raise ConfigError(f"{what} {path} is not inside the container mounts of profile "
                              f"{profile.name!r} ({shown}): the job could not see it; add a "
                              "mount (SRC:SRC) to container_mounts or move it")
