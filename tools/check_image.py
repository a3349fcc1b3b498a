"""Does this Python environment (a container image being built) meet megatron-core 0.19.2's needs?

    python tools/check_image.py [--constraints FILE] [--requirements FILE --extras qwen,...]

Python >= 3.12 and torch >= 2.6.0, where NGC's pre-release builds count as what they are: `2.6.0a0`
(NGC 25.01, 25.02) is older than 2.6.0, `2.7.0a0` (25.04) is newer. With `--constraints`, writes
the installed GPU stack (torch, Transformer Engine, Triton, CUDA libraries, ...) as pip
constraints, so installing the project on top can never replace them; with `--requirements`, the
project's own dependencies (pyproject.toml, with the named extras) except torch and megatron-core,
which the image provides and `--no-deps` installs. Exit 1 with one message otherwise. Used by the
Dockerfile; standard library and `packaging` only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from packaging.version import Version

# what NVIDIA builds into its images and the project must not replace
GPU_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|transformer[-_]engine\S*|"
                       r"flash[-_]attn|apex|nvidia[-_]\S+|cupy\S*|numpy)==", re.IGNORECASE)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVIDED = re.compile(r"^(torch|megatron-core)\b")  # the image's, or installed with --no-deps


def project_requirements(extras: list) -> list:
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [r for r in reqs if not PROVIDED.match(r)]


def meets(python: tuple, torch_version: str) -> str | None:
    """None if (python, torch) meet megatron-core 0.19.2's needs, else the reason."""
    if tuple(python[:2]) < (3, 12):
        return f"Python {'.'.join(map(str, python[:3]))} is older than 3.12"
    if Version(torch_version.split("+")[0]) < Version("2.6.0"):
        return f"torch {torch_version} is older than 2.6.0"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="check_image.py")
    p.add_argument("--constraints", help="write the GPU stack's versions here")
    p.add_argument("--requirements", help="write the project's other dependencies here")
    p.add_argument("--extras", default="", help="extras of pyproject.toml, comma-separated")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("check_image: no torch in this environment: start from an NGC PyTorch image",
              file=sys.stderr)
        return 1
    why = meets(sys.version_info, torch.__version__)
    if why:
        print(f"check_image: {why}: megatron-core 0.19.2 needs Python >= 3.12 and torch >= 2.6 "
              "(NGC PyTorch 25.04 or later)", file=sys.stderr)
        return 1
    if args.constraints:
        frozen = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"],
                                capture_output=True, text=True, check=True).stdout
        keep = [line for line in frozen.splitlines() if GPU_STACK.match(line)]
        with open(args.constraints, "w") as f:
            f.write("\n".join(keep) + "\n")
        print(f"check_image: Python {sys.version.split()[0]}, torch {torch.__version__}; "
              f"{len(keep)} packages of the image pinned in {args.constraints}")
    if args.requirements:
        reqs = project_requirements([e for e in args.extras.split(",") if e])
        with open(args.requirements, "w") as f:
            f.write("\n".join(reqs) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
