# make run  : create/update .venv, install kdpipe, run the default pipeline
# make test : create/update .venv, install kdpipe[dev], run the test suite
# make bench: install kdpipe[dev,bench] (adds torchdistill), run the benchmarks, rewrite BENCHMARKS.md
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: run test bench lint clean fashion-data

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes; the package itself is an
# editable install, so source edits need no reinstall.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The bench extra (torchdistill, a comparison baseline) only for `make bench`: `make test`
# and `make run` never install it. [dev,bench] includes [dev], so the dev stamp is fresh too.
$(BENCH_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP) $(BENCH_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) run_pipeline.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/run_all.py

# Fashion-MNIST's IDX files from Debian (configs/fashion.yaml finds them there, offline).
fashion-data:
	@test -d /usr/share/datasets/fashion-mnist || \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y dataset-fashion-mnist

lint: $(STAMP)
	$(PY) -m ruff check src steps pipelines tests benchmarks run_pipeline.py

clean:
	rm -rf $(VENV) .zen mlruns mlflow.db build *.egg-info
