# Two commands do all the set-up on a fresh machine:
#   make demo   create/refresh .venv, install, pre-train on the embedded digits, print k-NN
#   make test   create/refresh .venv, install, run the test suite
# Without a GPU the CPU build of torch is installed (torch==2.13.0, with triton==3.6.0, the
# release the GPU machines run, for the interpreter, and numpy<2.4, which that interpreter
# needs: see kernels/utils.py:check_interpreter); with one, the CUDA build from the
# default index. Override: make test TORCH="torch==2.11.0 triton==3.6.0 'numpy<2.4'".

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes || echo no)

ifeq ($(HAS_GPU),yes)
TORCH ?= torch
EXTRAS ?= dev,gpu
else
TORCH ?= torch==2.13.0 triton==3.6.0 'numpy<2.4'
EXTRAS ?= dev,dali
endif

.PHONY: install demo test test-all bench clean

$(VENV)/.installed: setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (gpu: $(HAS_GPU), torch: $(TORCH))"
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[$(EXTRAS)]" $(TORCH)
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m ibot_fast.cli demo

# make test: every subsystem, under 12 minutes on 2 cores (CI runs it); make test-all adds
# the tests marked `slow` (longer end-to-end runs, more parallel layouts). PYTEST_ARGS
# passes more options (e.g. PYTEST_ARGS="--durations=25"). pytest exits 5 when it
# collected nothing: that is a failure here, never a pass.
PYTEST_ARGS ?=
define run_pytest
	@$(PY) -m pytest tests $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests" >&2; exit 1; fi; exit $$rc
endef

test: install
	$(call run_pytest,-m "not slow")

test-all: install
	$(call run_pytest,)

bench: install
	$(PY) -m benchmarks.bench_train --smoke

clean:
	rm -rf $(VENV) build *.egg-info runs
