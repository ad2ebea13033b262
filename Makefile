# `make demo` and `make test` set up .venv (when missing or when pyproject.toml changed), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean test-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned to the local CPU build: a range would pull the multi-GB CUDA build
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e ".[test,torch]"
	# the bytecode on every core, where pip compiles on one (62 s against 40 on two cores); like pip's, a file this
	# Python cannot compile (torch ships 3.12-only test helpers) is left to compile at import, so its status is not fatal
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m gptjax generate --prompt "Once upon a time" --max-new-tokens 24 --greedy
	$(PY) -m gptjax generate --prompt "The meaning of life is" --max-new-tokens 24 --top-p 0.9 --seed 0
	$(PY) -m serving.demo --prompt "Once upon a time" --max-new-tokens 24

# the real launchers for the multi-process tests (Debian packages; installed when running as root)
test-deps:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! command -v mpirun >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    openmpi-bin slurm-wlm munge >/dev/null; fi

# two workers (a CI machine has two cores: much of a test's time is a server or a launcher starting); a file's
# tests stay on one worker, so its module-scoped server starts once. (Three workers measured no faster.)
test: $(STAMP) test-deps
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) build *.egg-info
