"""Checkpoints that prove themselves: `manifest.json` in each checkpoint folder.

At save, rank 0 lists every file the ranks wrote with its size and BLAKE2b digest, after all of
them finished and before the folder is renamed complete (so a listed checkpoint is a whole one;
the files are read back once, from the page cache they were just written through). At resume,
`verify` checks sizes first (a truncated or missing file is found without reading anything) and
then the digests (random bytes in a shard). Checkpoints saved before manifests existed have
none and are trusted as before.
"""

from __future__ import annotations

import hashlib
import json
import os

NAME = "manifest.json"
CHUNK = 1 << 22


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _files(folder: str):
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != NAME:
                yield rel


def write(folder: str) -> None:
    entries = {rel: {"size": os.path.getsize(os.path.join(folder, rel)),
                     "blake2b": _digest(os.path.join(folder, rel))}
               for rel in sorted(_files(folder))}
    tmp = os.path.join(folder, NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": entries}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, NAME))


def verify(folder: str) -> str:
    """'' when the checkpoint is whole, else what is wrong with it, in a few words."""
    if not os.path.isfile(os.path.join(folder, "metadata.json")):
        return "its metadata.json is missing"
    path = os.path.join(folder, NAME)
    if not os.path.isfile(path):
        return ""  # saved before manifests: trusted as before
    try:
        with open(path) as f:
            entries = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {NAME} is unreadable"
    for rel, entry in entries.items():  # sizes first: no file is read for these
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != entry["size"]:
            return f"{rel} has {os.path.getsize(full)} bytes, {entry['size']} were saved"
    for rel, entry in entries.items():
        if _digest(os.path.join(folder, rel)) != entry["blake2b"]:
            return f"{rel} does not hold the bytes that were saved (checksum)"
    return ""
