# Two entry points: `make demo` and `make test`. Both build .venv from nothing when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.greenmim-installed
MODEL ?= swin_tiny_patch4_window7_224
JOBS ?= 2

.PHONY: setup lint test test-fast demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# pytest itself, not `python -m pytest`: the latter puts the repository root on sys.path, where the top-level
# kernels/ folder would shadow the `kernels` package transformers looks for
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(VENV)/bin/pytest -q -p no:cacheprovider -n $(JOBS)

# the unit tier and the smallest equivalence case of every family, on JOBS pytest-xdist workers
test-fast: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider -n $(JOBS) -m "(unit or (fast and smallest)) and not slow"

demo: setup
	$(VENV)/bin/greenmim-convert convert $(MODEL) -o /tmp/green_swin_t.safetensors
	$(VENV)/bin/greenmim-convert verify $(MODEL) --mask-ratio 0 --batch-size 2
	$(VENV)/bin/greenmim-convert verify $(MODEL) --mask-ratio 0.75 --batch-size 4
	$(VENV)/bin/greenmim-convert bench $(MODEL) --batch-size 4 --steps 2

clean:
	rm -rf $(VENV) build *.egg-info
