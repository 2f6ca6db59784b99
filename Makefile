# The two set-up commands of the README:
#   make finetune   the main job on its embedded default
#   make test       the test suite, on the tested set of versions (requirements/tested.txt)
# Both create or reuse .venv and install what they need, within requirements/tested.txt: the set of
# versions CI passed with, so a fresh machine reproduces CI exactly. Two more:
#   make test-latest   the suite on today's newest releases, in .venv-latest
#   make pin           after test-latest passes: write its versions to requirements/tested.txt PyTorch is installed first, on its
# own, so that a CPU machine never downloads the multi-GB CUDA build that a bare `torch`
# requirement pulls: with an NVIDIA driver, pip's default build; else a CPU build already in
# pip's configured sources (find-links, a local wheel cache); else from the index of CPU wheels
# named by TORCH_INDEX_URL (PyTorch publishes one; set it in the environment or on the command
# line: `make test TORCH_INDEX_URL=...`). No index address is written into this repository.

VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= 2.13.0
TORCH_INDEX_URL ?=
TESTED := requirements/tested.txt
# pip options for the extras: the tested versions, or (test-latest) the newest releases
PIN    ?= --constraint $(TESTED)

.PHONY: finetune test venv test-latest pin

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
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	touch $@

$(VENV)/.installed-%: $(VENV)/.torch pyproject.toml $(TESTED)
	$(PY) -m pip install -q -e ".[$*]" $(PIN) --constraint $(VENV)/torch-pin.txt  # keeps the torch build above
	touch $@

venv: $(VENV)/.installed-test

finetune: $(VENV)/.installed-test
	$(VENV)/bin/minilora finetune

# MINILORA_TESTED_SET: the suite checks that what is installed is the tested set (empty: the newest)
test: $(VENV)/.installed-test
	MINILORA_TESTED_SET="$(if $(findstring $(TESTED),$(PIN)),$(TESTED))" \
	    $(VENV)/bin/pytest  # not `python -m`: the repository root must not be on sys.path

test-latest:
	rm -f .venv-latest/.installed-test
	$(MAKE) test VENV=.venv-latest PIN="--upgrade --upgrade-strategy eager"

# torch is installed on its own (CPU or CUDA build, see above), so it is left out of the pin.
pin:
	@rm -f .venv-latest/.installed-test
	@$(MAKE) --no-print-directory .venv-latest/.installed-test VENV=.venv-latest PIN="--upgrade --upgrade-strategy eager"
	@{ echo "# The versions the test suite passed with (make test-latest, then make pin). pip constraints:"; \
	   echo "# make test installs within them. torch is pinned by the Makefile's TORCH."; \
	   .venv-latest/bin/python -m pip freeze --all --exclude-editable | grep -v -i -E '^(pip|torch|nvidia-[a-z0-9-]*)=='; \
	 } > $(TESTED).tmp && mv $(TESTED).tmp $(TESTED)
	@echo "wrote $(TESTED)"
