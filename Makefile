# Two commands do all the set-up on a fresh machine:
#   make main   - install, train the tiny LTM on the embedded corpus, evaluate, generate, export a Hub-ready folder
#   make test   - install, run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUTPUT_DIR ?= runs/ltm-tiny
# The CPU wheel of torch; installed first so the project's `torch>=2.4` pulls no CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install main test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

LTM := $(VENV)/bin/ltm

main: install
	$(LTM) train --config configuration/ltm-tiny.json --recipe configuration/recipes/ltm-tiny.json --output_dir $(OUTPUT_DIR)
	$(LTM) generate $(OUTPUT_DIR) --prompt "ROMEO:" --max-new-tokens 64
	$(LTM) export $(OUTPUT_DIR) $(OUTPUT_DIR)/hub --overwrite

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
