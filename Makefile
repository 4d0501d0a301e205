# make run  : create/update .venv, install kdpipe, run the default pipeline
# make test : create/update .venv, install kdpipe[dev], run the test suite
# make bench: install kdpipe[dev,bench] (adds torchdistill), run the benchmarks, rewrite BENCHMARKS.md
# make serve: MLflow's model server over the promoted champion (MODEL=<registered model>, PORT=5001)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install run test bench serve lint clean fashion-data

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

bench: $(BENCH_STAMP) fashion-data
	$(PY) benchmarks/run_all.py

# MLflow's server execs `uvicorn` (and its workers) by name, so the venv's bin goes on PATH:
# `.venv/bin/mlflow models serve` alone fails with "Return code = 127" outside an
# activated venv. The registry is MLFLOW_TRACKING_URI, else ./mlflow.db (where `make run`
# writes); MODEL is tracking.registered_model of the config that promoted the champion.
MODEL ?= kdpipe-mnist-student
PORT  ?= 5001
HOST  ?= 127.0.0.1
MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
serve: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" MLFLOW_TRACKING_URI="$(MLFLOW_TRACKING_URI)" \
	  $(VENV)/bin/mlflow models serve -m "models:/$(MODEL)@champion" --env-manager local \
	  --host $(HOST) -p $(PORT)

# Fashion-MNIST's IDX files from Debian (configs/fashion.yaml finds them there, offline).
fashion-data:
	@test -d /usr/share/datasets/fashion-mnist || \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y dataset-fashion-mnist

lint: $(STAMP)
	$(PY) -m ruff check src steps pipelines tests benchmarks run_pipeline.py

clean:
	rm -rf $(VENV) .zen mlruns mlflow.db build *.egg-info
