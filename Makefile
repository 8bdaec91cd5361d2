# `make demo` runs the main job on a builtin model; `make test` runs the test suite.
# Each creates .venv and installs what it needs on a fresh machine (CPU torch, pinned).
VENV   ?= .venv
PY     := $(VENV)/bin/python
ADATSQ := $(VENV)/bin/adatsq
OUT    ?= out
MODEL  ?= tiny-flux
# pinned for reproducible set-up: torch 2.13.0 is the CPU build (an unpinned torch pulls CUDA)
TORCH_PIN     := torch==2.13.0
DIFFUSERS_PIN := diffusers==0.42.1

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) $(DIFFUSERS_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	@mkdir -p $(OUT)
	$(ADATSQ) models
	$(ADATSQ) inspect $(MODEL) --json $(OUT)/$(MODEL).layers.json
	$(ADATSQ) export $(MODEL) -o $(OUT)/$(MODEL).onnx
	$(ADATSQ) inspect $(OUT)/$(MODEL).onnx --layers

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) tools/bench_export.py --out benchmarks/results/export_cpu_tiny.json
	$(PY) tools/bench_export.py --preset wide --out benchmarks/results/export_cpu_wide.json

clean:
	rm -rf $(VENV) $(OUT) *.egg-info
