# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The tests also need the Beam, TPU-compiler (libtpu) and Hugging Face extras, and torch for golden logits.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,beam,tpu,hf]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/danlu demo --workdir demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --durations=15

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed-test
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) demo runs
