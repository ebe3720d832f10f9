# Every target does its own set-up: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.llmctl-installed

.PHONY: setup demo test lint bench bench-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk, never a multi-GB CUDA download.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests scripts

# Benchmarks whose peer installs with the project (wget, HF tokenizers, transformers, scipy).
bench: setup
	$(PY) scripts/bench_crawl.py
	$(PY) scripts/bench_tokenizer.py
	$(PY) scripts/bench_generate.py
	$(PY) scripts/bench_scaling.py

# Benchmarks against peers that live in their own venvs or checkouts under ../peers
# (datatrove, lm-evaluation-harness, nanoGPT, TRL): each script's docstring says how to install its peer.
bench-peers: setup
	$(PY) scripts/bench_extract.py
	$(PY) scripts/bench_filter.py
	$(PY) scripts/bench_dedup.py
	$(PY) scripts/bench_eval.py
	$(PY) scripts/bench_pretrain.py
	$(PY) scripts/bench_posttrain.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
