# Two entry points, both self-contained on a fresh Debian machine (as root, or with sudo):
#   make book   -> installs what is missing, then builds the book with every chapter executed
#   make test   -> installs what is missing, then runs the test suite
#   make check-book -> opens every page of a book built earlier in a headless browser, network off
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: book test check-book setup system clean

setup: system $(STAMP)

# Debian packages: the Fashion-MNIST files (offline default data), a headless Chromium for check-book and,
# where missing, Python's venv module.
system:
	@need=""; \
	[ -f $(FMNIST) ] || need="$$need dataset-fashion-mnist"; \
	command -v chromium-headless-shell >/dev/null 2>&1 || need="$$need chromium-headless-shell"; \
	command -v $(PYTHON) >/dev/null 2>&1 || need="$$need python3"; \
	$(PYTHON) -c "import venv, ensurepip" >/dev/null 2>&1 || need="$$need python3-venv"; \
	if [ -n "$$need" ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "apt-get install$$need"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$need; \
	  else echo "warning: no apt-get; install$$need yourself (Fashion-MNIST: set SFM_DATA or use --download)"; fi; \
	fi

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

book: setup
	$(BIN)/jupyter-book build . --all
	@echo "book: open _build/html/index.html"

# The suite in TEST_WORKERS processes (pytest-xdist), one torch thread each: on 2 cores this halves the wall
# time against one process with two threads, whose small ops mostly wait on each other. OMP_NUM_THREADS is
# set before Python starts (it also reaches the commands and kernels the tests start); TEST_WORKERS=0 runs
# one process with torch's own thread count.
TEST_WORKERS ?= 2
TEST_THREADS := $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1)
test: setup
	$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

# Every page of _build/html in headless Chromium with the network off: raw TeX, unrendered formulas,
# broken images, tracebacks/warnings in outputs, JavaScript errors. Screenshots in _build/screenshots.
check-book: setup
	$(BIN)/python scripts/check_book.py _build/html --screenshots _build/screenshots

clean:
	rm -rf _build
