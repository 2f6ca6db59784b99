# The two set-up commands of the README:
#   make finetune   the main job on its embedded default
#   make test       the test suite
# Both create or reuse .venv and install what they need. PyTorch is installed first, on its
# own: a CPU build where no NVIDIA driver is present, so a CPU machine never downloads the
# multi-GB CUDA build that a bare `torch` requirement would pull.

VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= 2.13.0
CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: finetune test venv

$(VENV)/.torch:
	python3 -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	    $(PY) -m pip install "torch==$(TORCH)"; \
	elif $(PY) -m pip install -q --no-index --no-deps "torch==$(TORCH)" 2>/dev/null; then \
	    $(PY) -m pip install -q "torch==$(TORCH)"; \
	else \
	    $(PY) -m pip install "torch==$(TORCH)" --index-url $(CPU_INDEX) \
	        --extra-index-url https://pypi.org/simple; \
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
