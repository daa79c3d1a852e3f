# The project's commands. Setup is idempotent: a .venv in the project, reinstalled when requirements change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
export HOST PORT

.DEFAULT_GOAL := help
.PHONY: help setup run serve test lint format train mlflow-ui bench clean

help: ## List the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(BIN)/.installed ## Create .venv and install the pinned requirements

run: setup ## Start the service on HOST:PORT (default 127.0.0.1:8000) with the embedded MLflow
	$(BIN)/gunicorn --config gunicorn.conf.py wsgi:app

serve: setup ## Production: gunicorn.conf.py on 0.0.0.0:$$PORT, WEB_CONCURRENCY workers (default 4)
	HOST=0.0.0.0 WEB_CONCURRENCY=$${WEB_CONCURRENCY:-4} $(BIN)/gunicorn --config gunicorn.conf.py wsgi:app

test: setup ## Run the test suite
	$(BIN)/python -m pytest

lint: setup ## Lint and check formatting with ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## Format the code with ruff
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

mlflow-ui: setup ## Open the MLflow UI on the embedded store (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.mlflow/mlflow.db --host 127.0.0.1 --port 5000

bench: setup ## Time a 10,000-row /predict against scikit-learn's own predict_proba
	$(BIN)/python scripts/bench_predict.py

clean: ## Remove the embedded MLflow store (all models) and caches
	rm -rf .mlflow .pytest_cache .ruff_cache
