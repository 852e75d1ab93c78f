# The two commands of the README: `make demo` (train the embedded default) and `make test`.
# Each creates the virtual environment first when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean-runs

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip check
	touch $(STAMP)

# Train a tiny CrossFlow on the synthetic shapes (CPU: about 11.5 min on 2 cores, on an embedded Ray
# cluster with 2 DeepSpeed ZeRO-2 workers), write sample grids, print ShapesEval.
demo: $(STAMP)
	$(VENV)/bin/crossflow train --config configs/demo.yaml train.out_dir=runs/demo
	@echo "samples: runs/demo/samples/final.png   metrics: runs/demo/metrics.jsonl"

# The whole suite (CPU only; GPU tests skip without CUDA; S3 tests need the RGW packages).
test: $(STAMP)
	-bash .ci/install-rgw.sh
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow"

clean-runs:
	rm -rf runs
