"""`cascade jobs [RUN_DIR|JOB_ID]`: a run's state, progress, restarts, last checkpoint and logs.

Progress is what the console prints (the last step line: loss, tokens seen, ETA, time) and
each rank's heartbeat (`runtime/heartbeat.py`): a rank whose process stopped is named, with how
far the others got. A run started without Slurm (torchrun, `cascade train`) shows these too.
State comes from `squeue` (pending, running), else `sacct` (finished, where accounting runs), else
`scontrol show job` (finished jobs Slurm still remembers); restarts and endings from the job's own
history in `<run_dir>/slurm/history.jsonl`; the checkpoint from the run directory. Without an
argument: one line per run submitted from here (`runs/**/slurm/jobs.jsonl`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess

from cascade_mega.config import ConfigError
from cascade_mega.runtime import heartbeat
from cascade_mega.slurm.requeue import history, last_checkpoint_step, read_jsonl


def add_arguments(p) -> None:
    p.add_argument("target", nargs="?", help="a run directory or a Slurm job id")
    p.add_argument("--root", default="runs", help="where run directories live (default: runs)")
    p.add_argument("--lines", type=int, default=15, help="log lines to show")
    p.add_argument("--json", action="store_true", help="one JSON object")


def _cmd(*args) -> str:
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def job_state(job_id: str) -> dict:
    line = _cmd("squeue", "-h", "-j", job_id, "-o", "%T|%M|%R")
    if line:
        state, elapsed, reason = line.splitlines()[0].split("|")
        return {"state": state, "elapsed": elapsed, "reason": reason, "source": "squeue"}
    line = _cmd("sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode,Elapsed")
    if line:
        state, code, elapsed = line.splitlines()[-1].split("|")
        return {"state": state, "exit_code": code, "elapsed": elapsed, "source": "sacct"}
    text = _cmd("scontrol", "show", "job", job_id)
    if text:
        fields = dict(re.findall(r"(\w+)=(\S*)", text))
        return {"state": fields.get("JobState"), "exit_code": fields.get("ExitCode"),
                "restarts": int(fields.get("Restarts", 0)), "elapsed": fields.get("RunTime"),
                "source": "scontrol"}
    return {"state": "UNKNOWN", "source": "none"}


def _jobs(run_dir: str) -> list:
    return read_jsonl(os.path.join(run_dir, "slurm", "jobs.jsonl"))


def _run_dir_of(job_id: str, root: str) -> str:
    for path in glob.glob(os.path.join(root, "**", "slurm", "jobs.jsonl"), recursive=True):
        if any(job["job_id"] == job_id for job in read_jsonl(path)):
            return os.path.dirname(os.path.dirname(path))
    text = _cmd("scontrol", "show", "job", job_id)
    out = dict(re.findall(r"(\w+)=(\S*)", text)).get("StdOut")
    if out and os.path.basename(os.path.dirname(out)) == "slurm":
        return os.path.dirname(os.path.dirname(out))
    raise ConfigError(f"job {job_id}: not submitted from here and unknown to Slurm")


def _tail(path: str, n: int) -> list:
    if n <= 0 or not path or not os.path.isfile(path):
        return []
    with open(path, errors="replace") as f:
        return f.read().splitlines()[-n:]


def progress(run_dir: str, rank0_log: str | None) -> dict:
    """The last step line of rank 0's log and every rank's heartbeat (who stopped)."""
    last = next((line for line in reversed(_tail(rank0_log, 200)) if line.startswith("step ")),
                None)
    if last is None:  # not a Slurm job: the metrics file's last training record
        train = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
                 if r.get("split") == "train"]
        if train:
            last = f"step {train[-1]['step']} | loss {train[-1]['loss']:.4f}"
    beats = heartbeat.read(run_dir)
    return {"last_step_line": last, "ranks": len(beats),
            "steps": sorted({b["step"] for b in beats if b["step"] is not None}),
            "stalled": heartbeat.stalled(run_dir),
            "peak_memory_gb": max((b["memory_gb"] or 0 for b in beats), default=None)}


def report(run_dir: str, lines: int = 15) -> dict:
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir}: no such run directory")
    jobs = _jobs(run_dir)
    job_id = jobs[-1]["job_id"] if jobs else None
    state = job_state(job_id) if job_id else {"state": "not a Slurm job", "source": "none"}
    ended = history(run_dir)
    logs = sorted(glob.glob(os.path.join(run_dir, "slurm", f"*-{job_id}.out"))) if job_id else []
    rank0 = sorted(glob.glob(os.path.join(run_dir, "slurm", job_id, "*.0.out"))) if job_id \
        else []
    return {"run_dir": run_dir, "job_id": job_id, **state,
            **progress(run_dir, rank0[-1] if rank0 else None),
            "restarts": max(state.get("restarts", 0),
                            sum(1 for h in ended if h["decision"].startswith("requeue"))),
            "last_checkpoint_step": last_checkpoint_step(run_dir),
            "endings": [f"exit {h['rc']} signal {h['signal'] or '-'}: {h['decision']}"
                        for h in ended],
            "job_log": logs[-1] if logs else None, "log_tail": _tail(logs[-1] if logs else "",
                                                                     lines),
            "rank0_log_tail": _tail(rank0[-1] if rank0 else "", lines)}


def run(args) -> int:
    if args.lines < 0:
        from cascade_mega.config import ConfigError

        raise ConfigError(f"--lines must be >= 0, got {args.lines}")
    if args.target is None:
        dirs = sorted({os.path.dirname(os.path.dirname(p)) for p in glob.glob(
            os.path.join(args.root, "**", "slurm", "jobs.jsonl"), recursive=True)})
        print(f"{'job':>10}  {'state':<12} {'restarts':>8} {'step':>8} {'ckpt':>8}  run_dir")
        for d in dirs:
            r = report(d, 0)
            ckpt = r["last_checkpoint_step"]
            step = r["steps"][-1] if r["steps"] else "-"
            stopped = "  (a rank stopped)" if r["stalled"] else ""
            print(f"{r['job_id']:>10}  {r['state']:<12} {r['restarts']:>8} {step:>8} "
                  f"{ckpt if ckpt is not None else '-':>8}  {d}{stopped}")
        return 0
    run_dir = args.target if os.path.isdir(args.target) else _run_dir_of(args.target, args.root)
    r = report(os.path.abspath(run_dir), args.lines)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"run_dir   {r['run_dir']}\njob       {r['job_id'] or '-'}  {r['state']}  (from "
          f"{r['source']})\nrestarts  {r['restarts']}\ncheckpoint step {r['last_checkpoint_step']}")
    if r["last_step_line"]:
        print(f"progress  {r['last_step_line']}")
    if r["ranks"]:
        print(f"ranks     {r['ranks']} at step {'/'.join(map(str, r['steps'])) or '-'}, peak "
              f"memory {r['peak_memory_gb'] or 0:.2f} GiB")
    for line in r["stalled"]:
        print(f"  heartbeat: {line}")
    for e in r["endings"]:
        print(f"  ended: {e}")
    for title, key in (("job log", "log_tail"), ("rank 0", "rank0_log_tail")):
        if r[key]:
            print(f"--- {title} (last {len(r[key])} lines)")
            print("\n".join(r[key]))
    return 0
