# The two set-up commands of the README:
#   make finetune   the main job on its embedded default
#   make test       the test suite
# Both create or reuse .venv and install what they need. PyTorch is installed first, on its
# own, so that a CPU machine never downloads the multi-GB CUDA build that a bare `torch`
# requirement pulls: with an NVIDIA driver, pip's default build; else a CPU build already in
# pip's configured sources (find-links, a local wheel cache); else from the index of CPU wheels
# named by TORCH_INDEX_URL (PyTorch publishes one; set it in the environment or on the command
# line: `make test TORCH_INDEX_URL=...`). No index address is written into this repository.

VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= 2.13.0
TORCH_INDEX_URL ?=

.PHONY: finetune test venv

$(VENV)/.torch:
	python3 -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	    $(PY) -m pip install "torch==$(TORCH)"; \
	elif $(PY) -m pip install -q --no-index --no-deps "torch==$(TORCH)" 2>/dev/null; then \
	    $(PY) -m pip install -q "torch==$(TORCH)"; \
	elif [ -n "$(TORCH_INDEX_URL)" ]; then \
	    $(PY) -m pip install "torch==$(TORCH)" --extra-index-url "$(TORCH_INDEX_URL)"; \
	else \
	    echo "No CPU build of torch $(TORCH) is in pip's sources, and a plain install would download the"; \
	    echo "CUDA build (several GB). Set TORCH_INDEX_URL to an index of CPU wheels (PyTorch publishes"; \
	    echo "one), or install torch yourself into $(VENV) first; then run make again."; \
	    exit 1; \
	fi
	touch $@

$(VENV)/.installed-%: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

venv: $(VENV)/.installed-test

finetune: $(VENV)/.installed-test
	$(VENV)/bin/minilora finetune

test: $(VENV)/.installed-test
	$(VENV)/bin/pytest  # not `python -m`: the repository root must not be on sys.path
