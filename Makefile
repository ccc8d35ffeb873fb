# Two commands do all the set-up on a fresh machine:
#   make main   - install (from the lock), train the tiny LTM and its Llama peer on the embedded corpus, compare them
#                 (bounds vs exact perplexity, speed, FLOPs), generate, export a Hub-ready folder
#   make test   - install (from the lock), run the test suite (what .ci/run calls, with `make test-latest` after it)
# Other targets:
#   make test-gpu    - the device suite (tests/test_cuda.py) alone, on a CUDA GPU (docs/gpu.md)
#   make test-latest - the drift canary: the suite on the newest releases that pyproject.toml allows (fresh venv)
#   make lock        - refresh constraints.txt from the newest releases (then run `make test` on it and commit)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LATEST_VENV ?= .venv-latest
LOCK ?= constraints.txt
OUTPUT_DIR ?= runs/ltm-tiny
PEER_DIR ?= $(OUTPUT_DIR)-llama
EXTRAS := test,bench,peft
# torch: the CPU wheel, installed first and held at the lock's version in every venv (also the canary's), so pip never
# pulls a CUDA build (several GB of nvidia-* wheels) onto a CPU machine. Override for a GPU machine, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= $(shell grep -i '^torch==' $(LOCK))
# The lowest transformers that pyproject.toml declares; the remote-code tests load the exported model under it too.
MIN_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml)
SHOW_VERSIONS = -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|safetensors|datasets|evaluate|huggingface.hub|accelerate|lm.eval|peft)=='

.PHONY: install main main-job test test-gpu test-latest lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) $(TORCH_SPEC)
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[$(EXTRAS)]"
	rm -rf $(VENV)/transformers-min
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/transformers-min "transformers==$(MIN_TRANSFORMERS)"
	touch $@

LTM ?= $(VENV)/bin/ltm

# The main job re-runs into its own folders (the LTM's and its Llama peer's): `make main` replaces the previous
# `make main` runs there (and nothing else; `ltm train` alone refuses a non-empty folder). `main-job` is the job without the install, e.g. on a machine
# with its own torch: `make main-job LTM="python3 -m modeling_ltm.tooling.cli"` (docs/gpu.md).
main: install
	$(MAKE) main-job

main-job:
	$(LTM) train --config configuration/ltm-tiny.json --recipe configuration/recipes/ltm-tiny.json --output_dir $(OUTPUT_DIR) \
		--overwrite_output_dir
	$(LTM) train --config configuration/ltm-tiny.json --recipe configuration/recipes/ltm-tiny.json --baseline llama \
		--tokenizer $(OUTPUT_DIR) --output_dir $(PEER_DIR) --overwrite_output_dir --sample_max_new_tokens 0
	$(LTM) compare $(OUTPUT_DIR) $(PEER_DIR)
	$(LTM) generate $(OUTPUT_DIR) --prompt "ROMEO:" --max-new-tokens 64
	$(LTM) export $(OUTPUT_DIR) $(OUTPUT_DIR)/hub --overwrite

test: install
	@echo "== pytest on the lock ($(LOCK)) =="; $(PY) $(SHOW_VERSIONS)
	LTM_TRANSFORMERS_MIN_SITE=$(CURDIR)/$(VENV)/transformers-min $(PY) -m pytest -q

# The device suite alone (tests/test_cuda.py, every user path on a CUDA GPU; skipped, saying so, where torch sees none).
# On a GPU machine with no internet, see docs/gpu.md (bench/gpu_check.sh runs it there with the GPU benches).
test-gpu: install
	$(PY) -m pytest -q -rs -m gpu tests/test_cuda.py

# A fresh venv every time, so it really holds today's newest releases.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	grep -i '^torch==' $(LOCK) > $(LATEST_VENV)/torch-constraint.txt
	$(LATEST_VENV)/bin/python -m pip install --quiet -c $(LATEST_VENV)/torch-constraint.txt $(TORCH_SPEC)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
		-c $(LATEST_VENV)/torch-constraint.txt -e ".[$(EXTRAS)]"
	$(LATEST_VENV)/bin/python -m pip install --quiet --no-deps --target $(LATEST_VENV)/transformers-min \
		"transformers==$(MIN_TRANSFORMERS)"
	@echo "== pytest on the newest releases ==";  $(LATEST_VENV)/bin/python $(SHOW_VERSIONS)
	LTM_TRANSFORMERS_MIN_SITE=$(CURDIR)/$(LATEST_VENV)/transformers-min $(LATEST_VENV)/bin/python -m pytest -q

# Refresh the lock from the canary's venv (the newest releases); torch keeps the CPU build's plain version.
lock: test-latest
	{ echo "# Exact versions the suite last passed with (make test-latest, then make lock). Refresh: make lock"; \
	  $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs
