"""Writing a conversion's output all at once: into `OUT.partial`, renamed to OUT at the end, so
a failed conversion leaves nothing behind and an existing OUT is never overwritten."""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager

from cascade_mega.config import ConfigError


@contextmanager
def staged(out: str):
    """Write into OUT.partial; rename to OUT on success, remove it on any failure."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ConfigError(f"{out} exists: remove it or choose another output directory")
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, out)


def progress(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="tensor", file=sys.stderr,
                disable=not sys.stderr.isatty())
