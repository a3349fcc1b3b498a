"""Inside the job, after its training step ended: requeue it or not, and keep the history.

    python -m cascade_mega.slurm.requeue RUN_DIR --rc RC --signal USR1|TERM|'' --max-restarts N

prints one line starting with `requeue`, `done` or `stop` (the job script requeues on the first)
and appends the ending to `<run_dir>/slurm/history.jsonl` (what `cascade jobs` shows). It runs in
the batch shell with the host's `python3`, outside any container: standard library only, and
Python 3.6 syntax (an older cluster's system Python; `tests/test_slurm.py` checks the syntax).
- exit 0 without a signal: the run is done (or stopped at `train.exit_interval`): done.
- USR1, the time-limit warning: the ranks checkpointed; requeue, unless the restarts are spent.
- TERM: preemption or a cancel. Preempted (Slurm's PreemptTime falls in this run): requeue, since
  a job that ends on its own within the grace time is not requeued by Slurm; cancelled: done.
- a failure: requeue (a node or network fault often passes), but not when the previous ending
  was the same failure at the same checkpoint: a job that fails the same way twice stops
  instead of looping; nor past --max-restarts.
"""

import argparse
import json
import os
import re
import subprocess
import time


def last_checkpoint_step(run_dir: str):
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    name = open(pointer).read().strip()
    return int(name.split("_")[-1]) if name.startswith("iter_") else None


def stop_signal(run_dir: str, trapped: str) -> str:
    """The signal that stopped the training: the one the job script trapped (USR1 sent to the batch
    shell), else the one the trainer recorded in exit.json (preemption signals the ranks only)."""
    if trapped:
        return trapped
    path = os.path.join(run_dir, "exit.json")
    try:
        with open(path) as f:
            recorded = json.load(f).get("signal") or ""
    except (OSError, ValueError):
        return ""
    return recorded[3:] if recorded.startswith("SIG") else recorded


def read_jsonl(path: str) -> list:
    """The records of a JSON-lines file, or [] when there is none yet."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def history(run_dir: str) -> list:
    return read_jsonl(os.path.join(run_dir, "slurm", "history.jsonl"))


def preempted() -> bool:
    """Whether Slurm preempted this run of the job (PreemptTime at or after its StartTime)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    fields = dict(re.findall(r"(\w+)=(\S+)", out))
    when, start = fields.get("PreemptTime", "None"), fields.get("StartTime", "")
    return when not in ("None", "Unknown") and when >= start


def decide(run_dir: str, rc: int, signal: str, max_restarts: int, restart: int,
           previous: list, was_preempted: bool = False) -> str:
    step = last_checkpoint_step(run_dir)
    if was_preempted:  # whatever the exit: the ranks may have been stopped anywhere
        return f"requeue: preempted, checkpoint at step {step}"
    if signal in ("TERM", "INT"):
        return "done: SIG{} (cancelled)".format(signal)
    if rc == 0 and not signal:
        return "done"
    if restart >= max_restarts:
        return f"stop: {restart} restarts reached --max-restarts {max_restarts}"
    if signal == "USR1":
        return f"requeue: time-limit warning, checkpoint at step {step}"
    failures = [h for h in previous if h["rc"] not in (0, None) and not h.get("signal")]
    if failures and failures[-1]["rc"] == rc and failures[-1]["last_step"] == step:
        return (f"stop: failed the same way twice (exit {rc}, no progress past checkpoint step "
                f"{step}); see the logs")
    return f"requeue: exit {rc}, resuming from checkpoint step {step}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cascade_mega.slurm.requeue")
    p.add_argument("run_dir")
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--signal", default="")
    p.add_argument("--max-restarts", type=int, default=20)
    args = p.parse_args(argv)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    args.signal = stop_signal(args.run_dir, args.signal)
    decision = decide(args.run_dir, args.rc, args.signal, args.max_restarts, restart,
                      history(args.run_dir), (args.signal == "TERM" or args.rc != 0) and preempted())
    os.makedirs(os.path.join(args.run_dir, "slurm"), exist_ok=True)
    with open(os.path.join(args.run_dir, "slurm", "history.jsonl"), "a") as f:
        f.write(json.dumps({"job_id": os.environ.get("SLURM_JOB_ID"), "restart": restart,
                            "rc": args.rc, "signal": args.signal or None,
                            "last_step": last_checkpoint_step(args.run_dir),
                            "decision": decision, "time": time.time()}) + "\n")
    print(decision)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
