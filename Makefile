# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# glibc returns big activation buffers to the OS after every step by default; keeping them mapped
# is measured faster on CPU (see README, Performance).
export MALLOC_MMAP_THRESHOLD_ ?= 1000000000
export MALLOC_TRIM_THRESHOLD_ ?= 1000000000

# Spinning OpenMP threads cost 10-50x when tests run several processes on 2 shared cores (measured): sleep instead.
test demo: export OMP_WAIT_POLICY = PASSIVE

.PHONY: test demo lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pinned torch: these wheels lie on local disk; any other version downloads gigabytes.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,onnx,analysis]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check refconv_train tests scripts

demo: $(STAMP)
	bash scripts/demo.sh

bench: $(STAMP)
	$(BIN)/python scripts/benchmark.py --model mobilenetv2_100 --img-size 128 --batch-size 32

clean:
	rm -rf $(VENV) runs
