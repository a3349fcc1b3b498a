"""Which code a process runs: the project's commit, whether its files differ from it, and where
it was imported from; what a rank prints at start, and the check that a Slurm job whose code was
frozen at submission (`slurm/snapshot.py`) imports that copy and nothing else."""

from __future__ import annotations

import functools
import json
import os
import subprocess

from cascade_mega.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# what a job imports or reads: the library, its kernels and launchers, the configs, the job
# templates, the thin tools and pyproject.toml (whose package-dir mapping gives kernels/ and
# launchers/ their import names, `cascade_mega/__init__.py`); not the tests
PACKAGED = ("cascade_mega", "kernels", "launchers", "configs", "tools", "slurm",
            "pyproject.toml")
ENV = "CASCADE_CODE"  # set in a job: where its code must come from


def git(*args, root=ROOT):
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def describe(root: str = ROOT) -> dict:
    """The commit and whether the working tree differs from it (None where there is no git)."""
    head = git("rev-parse", "HEAD", root=root)
    status = git("status", "--porcelain", "--untracked-files=normal", "--", *PACKAGED, root=root)
    return {"commit": head.decode().strip() if head else None,
            "dirty": bool(status and status.strip()), "source": root}


@functools.lru_cache(maxsize=None)  # the start line and the tracked params ask alike
def record(code_dir: str = ROOT) -> dict:
    """What `code_dir` holds: the record frozen with a job's copy, else the checkout's state."""
    path = os.path.join(code_dir, "code.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return describe(code_dir)


def summary(code_dir: str) -> str:
    """One line naming the code a process runs."""
    rec = record(code_dir)
    commit = (rec.get("commit") or "no git commit")[:12]
    return f"code {commit}{' + uncommitted changes' if rec.get('dirty') else ''} from {code_dir}"


def check_running() -> str:
    """In a rank: the directory the project was imported from (`ROOT`, this module's own). Where
    the job froze its code (CASCADE_CODE), it must be that copy."""
    want = os.environ.get(ENV)
    if want and os.path.realpath(ROOT) != os.path.realpath(want):
        raise ConfigError(
            f"this job froze its code in {want} but imported cascade_mega from {ROOT}: the "
            "interpreter put the working directory first (PYTHONSAFEPATH needs Python >= 3.11); "
            "use a newer Python in the profile or submit with --code live")
    return ROOT
