"""The code a job runs, frozen when it is submitted (like NeMo-Run's packager).

`cascade submit` copies the project's sources as they are at submission (the commit plus any
uncommitted or untracked, not ignored, change) into `<log_dir>/code/` and records what it took
in `code.json` (commit, dirty, the uncommitted diff in `code.diff`). The job puts that copy first
on `PYTHONPATH` (and `PYTHONSAFEPATH=1` keeps the working directory, a checkout that may have
moved on, off the path), so a requeued restart a week later runs the code it was submitted with.
Every rank checks it (`runtime/provenance.py`): a rank that imported the project from anywhere
else stops with one message. `--code live` keeps the old behaviour: the job imports whatever the
working directory (or the installed package) holds when it starts.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from cascade_mega.runtime.provenance import PACKAGED, ROOT, git, describe


def _files(root: str) -> list:
    """The project's files under PACKAGED: git's view (tracked, plus untracked not ignored), or
    a walk of the folders where the sources are not a git checkout."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", root=root)
    if listed is not None:
        names = [n for n in listed.decode().split("\0") if n]
    else:
        names = []
        for top in PACKAGED:
            path = os.path.join(root, top)
            if os.path.isfile(path):
                names.append(top)
            for folder, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                names += [os.path.relpath(os.path.join(folder, f), root) for f in files]
    return sorted(n for n in set(names) if n.split("/")[0] in PACKAGED
                  and os.path.lexists(os.path.join(root, n)))


def freeze(dest: str, root: str = ROOT) -> dict:
    """Copy the sources into `dest` (replacing an older copy) and return what was recorded."""
    record = describe(root)
    tmp = dest + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = _files(root)
    for name in files:
        src, dst = os.path.join(root, name), os.path.join(tmp, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
    record.update(files=len(files), time=time.time())
    if record["dirty"]:
        diff = git("diff", "HEAD", "--binary", "--", *PACKAGED, root=root) or b""
        with open(os.path.join(tmp, "code.diff"), "wb") as f:
            f.write(diff)
    with open(os.path.join(tmp, "code.json"), "w") as f:
        json.dump(record, f, indent=1)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return record
