# The project's commands. Setup is idempotent: a .venv in the project, reinstalled when requirements change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
export HOST PORT

# Lambda's python3.12 runtime runs on Amazon Linux 2023 (glibc 2.34): the package is built with Python 3.12
# and wheels for manylinux 2.28 or older, whatever this machine's own glibc is. No AWS credentials needed.
LAMBDA_PYTHON ?= $(shell for p in python3.12 $$(ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null); do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo $$p && break; done)
STAGE ?= production
# A *_compiled stage (production_compiled) is the compiled-only package: ONNX Runtime and numpy, no scikit-learn,
# scipy or pandas; its own requirements file and build venv, one zip without slim_handler.
COMPILED_STAGE := $(filter %_compiled,$(STAGE))
LAMBDA_REQUIREMENTS := requirements-lambda$(if $(COMPILED_STAGE),-compiled).txt
LVENV := .venv-lambda$(if $(COMPILED_STAGE),-compiled)
LSITE := $(LVENV)/lib/python3.12/site-packages
LAMBDA_RUNTIME := build/lambda-runtime
MANYLINUX := $(foreach tag,manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1,--platform $(tag)_x86_64)
ZAPPA := cd $(CURDIR) && VIRTUAL_ENV=$(CURDIR)/$(LVENV) PATH=$(CURDIR)/$(LVENV)/bin:$$PATH AWS_DEFAULT_REGION=$${AWS_DEFAULT_REGION:-us-east-1} $(LVENV)/bin/zappa


.DEFAULT_GOAL := help
.PHONY: help setup install node-tools postman run serve token worker test lint format mlflow-ui bench bench-train bench-rollout bench-costs soak clean package upload-project lambda-deploy lambda-update image image-base image-wheels

help: ## List the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# Two installs: what the service needs (requirements.txt: make install, run, serve) and, for developers,
# the tests, lint and packaging tools on top (requirements-dev.txt: make setup, test, lint, package).
# uv (pinned in requirements-uv.txt) installs them, and the pinned requirements files stay the lock. The venv
# is made without pip (seeding pip costs 3-8 s, half of a warm install) and this Python's own pip puts uv
# into it (`pip --python`, pip 22.3 or later). Where that fails, the venv gets pip and pip installs uv; where
# uv cannot be had at all, pip does the install itself.
$(BIN)/.uv: requirements-uv.txt
	test -x $(BIN)/python || $(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(BIN)/python install --quiet --disable-pip-version-check --no-compile -r requirements-uv.txt \
		|| { $(VENV_PIP) && $(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-uv.txt; } \
		|| echo "uv could not be installed: pip installs the requirements instead"
	touch $@
VENV_PIP = { $(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip --default-pip >/dev/null; }
# $(2) is --compile-bytecode for `make setup`: every .pyc file written once, at install, on all cores (uv writes none
# by default). Where PYTHONDONTWRITEBYTECODE is set (CI machines, many images) no import writes them either, and every
# process of the tests and benches compiled MLflow, pandas and scikit-learn again: 4 s more per start (README,
# "Start-up"). `make install` leaves it out: compiling all 17,000 modules costs a first `make run` 16 s, and the start
# then writes the .pyc files of what it imports (`make run` clears PYTHONDONTWRITEBYTECODE for the .venv).
PIP_INSTALL = if [ -x $(BIN)/uv ]; then $(BIN)/uv pip install --quiet $(2) --python $(BIN)/python $(1); \
	else $(VENV_PIP) && $(BIN)/python -m pip install --quiet --disable-pip-version-check $(1); fi

# Just installed: the first start's later imports are compiled on the other core while it starts
# (scripts/warm_bytecode.py; about 3 s of a first `make run`).
$(BIN)/.installed-runtime: requirements.txt $(BIN)/.uv
	$(call PIP_INSTALL,-r requirements.txt)
	PYTHONDONTWRITEBYTECODE= timeout 300 nice $(BIN)/python scripts/warm_bytecode.py >$(VENV)/warm-bytecode.log 2>&1 &
	touch $@

$(BIN)/.installed: requirements.txt requirements-dev.txt $(BIN)/.uv
	$(call PIP_INSTALL,-r requirements-dev.txt,--compile-bytecode)
	touch $@ $(BIN)/.installed-runtime

install: $(BIN)/.installed-runtime ## Create .venv with only what the service needs (requirements.txt)

setup: $(BIN)/.installed ## Create .venv with the service and the test, lint and packaging tools

# newman (runs the Postman collection) and openapi-to-postmanv2 (Postman's importer), pinned, in build/node.
NODE_TOOLS := build/node
NEWMAN_VERSION := 6.2.2
OPENAPI_TO_POSTMAN_VERSION := 6.3.3
NODE_STAMP := $(NODE_TOOLS)/.installed-$(NEWMAN_VERSION)-$(OPENAPI_TO_POSTMAN_VERSION)
$(NODE_STAMP):
	npm install --prefix $(NODE_TOOLS) --no-audit --no-fund --loglevel=error \
		newman@$(NEWMAN_VERSION) openapi-to-postmanv2@$(OPENAPI_TO_POSTMAN_VERSION)
	touch $@

node-tools: $(NODE_STAMP) ## Install newman and openapi-to-postmanv2 (npm) into build/node

postman: node-tools ## Run the Postman collection against the service on HOST:PORT (token from API_TOKEN)
	$(NODE_TOOLS)/node_modules/.bin/newman run postman/model-serving.postman_collection.json \
		--env-var baseUrl=http://$(HOST):$(PORT) --env-var token=$${API_TOKEN:-}

run: install ## Start the service on HOST:PORT (default 127.0.0.1:8000) with the embedded MLflow
	PYTHONDONTWRITEBYTECODE= $(BIN)/gunicorn --config gunicorn.conf.py wsgi:app

token: install ## Print the API token /train and /use-model need (made in STATE_DIR if API_TOKEN is unset)
	@$(BIN)/python -c 'import sys; from kernel.auth import main; sys.exit(main())'

serve: install ## Production: gunicorn.conf.py on 0.0.0.0:PORT, WEB_CONCURRENCY workers (default 4)
	PYTHONDONTWRITEBYTECODE= HOST=0.0.0.0 WEB_CONCURRENCY=$${WEB_CONCURRENCY:-4} $(BIN)/gunicorn --config gunicorn.conf.py wsgi:app

worker: install ## Start a training worker for TRAIN_EXECUTOR=celery (CELERY_BROKER_URL; WORKER_ARGS for celery's options)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m training.celery_worker $(WORKER_ARGS)

test: setup node-tools $(LAMBDA_RUNTIME)/.installed ## Run the test suite (builds the Lambda package first where Python 3.12 exists)
	@if [ -n "$(LAMBDA_PYTHON)" ]; then $(MAKE) --no-print-directory package \
		&& $(MAKE) --no-print-directory package STAGE=production_compiled; \
	else echo "No Python 3.12 here: the Lambda handler tests will skip (CI sets REQUIRE_LAMBDA=1)"; fi
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest

lint: setup ## Lint, check formatting (ruff) and who may import whom (import-linter: ARCHITECTURE.md)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup ## Format the code with ruff
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

mlflow-ui: install ## Open the MLflow UI on the embedded store (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.mlflow/mlflow.db --host 127.0.0.1 --port 5000

bench-train: setup ## POST→succeeded of a small training job (local executor) against a bare MLflow script, in one run
	$(BIN)/python scripts/bench_train.py

bench: setup ## This service against its peers with wrk, then what a rollout costs (BENCH_SECONDS=3 shortens it)
	$(BIN)/python scripts/bench_serving.py
	$(BIN)/python scripts/bench_rollout.py

bench-rollout: setup ## What a sticky canary at 50 % and a shadow at 100 % add to one-row /predict, at -c1, -c4 and -c16
	$(BIN)/python scripts/bench_rollout.py

bench-costs: setup ## What drift counting and the prediction log cost under load: each on against off, alternating runs
	$(BIN)/python scripts/bench_settings.py --with DRIFT_ENABLED=true --with PREDICTION_LOG=off --without DRIFT_ENABLED=false --without PREDICTION_LOG=off --budget 3,3,5 --pairs 5 --seconds 10
	$(BIN)/python scripts/bench_settings.py --with PREDICTION_LOG=on --without PREDICTION_LOG=off --budget 5,5,10 --pairs 3 --seconds 10
	$(BIN)/python scripts/bench_settings.py --with PREDICTION_LOG_INPUTS=true --without PREDICTION_LOG=off --budget 8,8,10 --pairs 3 --seconds 10

soak: setup ## Ten minutes (SOAK_MINUTES) of mixed load, swaps and training on gunicorn; prints failures, p50/p99, RSS
	$(BIN)/python scripts/soak.py

clean: ## Remove the embedded MLflow store (all models), caches and build output
	rm -rf .mlflow .pytest_cache .ruff_cache dist build handler_venv

# ---- AWS Lambda (Zappa), inference role ----------------------------------------------------------------
# uv (from .venv) installs Zappa into the build venv and the Lambda requirements into its site-packages, as
# wheels for Lambda's platform; pip does both where .venv has no uv.
$(LVENV)/.installed: $(LAMBDA_REQUIREMENTS) requirements-dev.txt $(BIN)/.uv
	@test -n "$(LAMBDA_PYTHON)" || { echo "make package needs Python 3.12 (python3.12 on PATH, or LAMBDA_PYTHON=...)"; exit 1; }
	test -x $(LVENV)/bin/python || $(LAMBDA_PYTHON) -m venv $(LVENV)
	if [ -x $(BIN)/uv ]; then \
		$(BIN)/uv pip install --quiet --python $(LVENV)/bin/python $$(grep '^zappa==' requirements-dev.txt) \
		&& $(BIN)/uv pip install --quiet --python $(LVENV)/bin/python --target $(LSITE) --python-platform x86_64-manylinux_2_28 \
			--python-version 3.12 --only-binary :all: -r $(LAMBDA_REQUIREMENTS); \
	else \
		$(LVENV)/bin/python -m pip install --quiet --upgrade pip \
		&& $(LVENV)/bin/python -m pip install --quiet $$(grep '^zappa==' requirements-dev.txt) \
		&& $(LVENV)/bin/python -m pip install --quiet --upgrade --target $(LSITE) $(MANYLINUX) --python-version 3.12 \
			--implementation cp --only-binary=:all: -r $(LAMBDA_REQUIREMENTS); \
	fi
	touch $@

# What Lambda's runtime provides besides the package (boto3), for the handler tests.
$(LAMBDA_RUNTIME)/.installed: requirements-lambda.txt $(BIN)/.uv
	if [ -x $(BIN)/uv ]; then \
		$(BIN)/uv pip install --quiet --python $(BIN)/python --target $(LAMBDA_RUNTIME) $$(grep '^boto3==' requirements-lambda.txt); \
	else $(BIN)/python -m pip install --quiet --no-compile --upgrade --target $(LAMBDA_RUNTIME) $$(grep '^boto3==' requirements-lambda.txt); fi
	touch $@

package: setup dist/.built-$(STAGE) ## Build the Lambda package offline with Zappa (dist/) and check its size

PACKAGE_INPUTS := $(wildcard serving/*.py kernel/*.py service/*.py) wsgi.py zappa_settings.json $(LAMBDA_REQUIREMENTS) scripts/precompile_project.py \
	scripts/package_size.py
# A slim stage gives the handler zip and the project archive (S3); a *_compiled stage gives one zip, the whole function.
dist/.built-$(STAGE): $(PACKAGE_INPUTS) $(LVENV)/.installed
	rm -rf dist/.built-$(STAGE) dist/lambda-$(STAGE)-* handler_venv model-serving-$(STAGE)-*.tar.gz && mkdir -p dist
	AWS_ACCESS_KEY_ID=$${AWS_ACCESS_KEY_ID:-none} AWS_SECRET_ACCESS_KEY=$${AWS_SECRET_ACCESS_KEY:-none} \
		$(ZAPPA) package $(STAGE) -o dist/lambda-$(STAGE)-handler.zip
	rm -rf handler_venv
ifeq ($(COMPILED_STAGE),)
	mv model-serving-$(STAGE)-*.tar.gz dist/lambda-$(STAGE)-project.tar.gz
	$(LVENV)/bin/python scripts/precompile_project.py dist/lambda-$(STAGE)-project.tar.gz
	$(BIN)/python scripts/package_size.py dist/lambda-$(STAGE)-handler.zip dist/lambda-$(STAGE)-project.tar.gz \
		$$($(BIN)/python -c "import json; print(json.load(open('zappa_settings.json'))['production']['ephemeral_storage']['Size'])")
else
	$(LVENV)/bin/python scripts/precompile_project.py dist/lambda-$(STAGE)-handler.zip
	$(BIN)/python scripts/package_size.py dist/lambda-$(STAGE)-handler.zip
endif
	touch $@

# Ship exactly what `make package` built (and tested): the project archive goes to the key Zappa's slim
# handler reads, the handler zip goes to the function. Needs AWS credentials; not run by the tests.
upload-project:
ifeq ($(COMPILED_STAGE),)
	$(BIN)/python -c "import boto3, json; \
		settings = json.load(open('zappa_settings.json')); stage = {**settings['production'], **settings['$(STAGE)']}; \
		boto3.client('s3').upload_file('dist/lambda-$(STAGE)-project.tar.gz', stage['s3_bucket'], \
		'$(STAGE)_' + stage['project_name'] + '_current_project.tar.gz')"
else
	@echo "$(STAGE) is one zip (no slim_handler): no project archive to upload"
endif

lambda-deploy: package upload-project ## First deployment of STAGE (default production) with Zappa (AWS credentials)
	$(ZAPPA) deploy $(STAGE) -z dist/lambda-$(STAGE)-handler.zip

lambda-update: package upload-project ## Ship the current code to STAGE (zappa update)
	$(ZAPPA) update $(STAGE) -z dist/lambda-$(STAGE)-handler.zip

# ---- Container images (Dockerfile; docs/deploy-aws.md) -------------------------------------------------
# Two targets of one Dockerfile, tagged $(IMAGE):inference (compiled-only) and $(IMAGE):full. The wheels of
# the pinned requirements are downloaded here, for Linux on IMAGE_ARCH and Python 3.11, into build/wheels
# (the build context): the build installs them offline, and a rebuild downloads nothing. pip evaluates
# markers for the host's Python: a pin marked `python_full_version < ...` is downloaded whatever they say.
IMAGE ?= model-serving
BASE_IMAGE ?= python:3.11-slim
IMAGE_TARGETS ?= inference full
IMAGE_ARCH ?= $(subst arm64,aarch64,$(shell uname -m))
IMAGE_WHEELS := build/wheels
IMAGE_REQUIREMENTS := requirements.txt requirements-inference.txt requirements-lambda-compiled.txt requirements-uv.txt
IMAGE_PLATFORMS := $(foreach tag,manylinux_2_36 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
	manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1,--platform $(tag)_$(IMAGE_ARCH))

$(IMAGE_WHEELS)/.downloaded: $(IMAGE_REQUIREMENTS)
	rm -rf $(IMAGE_WHEELS) && mkdir -p $(IMAGE_WHEELS)
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --dest $(IMAGE_WHEELS) --only-binary=:all: \
		--python-version 3.11 --implementation cp --abi cp311 $(IMAGE_PLATFORMS) $(foreach f,$(filter-out requirements-lambda-compiled.txt,$(IMAGE_REQUIREMENTS)),-r $(f))
	sed -n 's/ *; *python_full_version.*//p' $(IMAGE_REQUIREMENTS) > $(IMAGE_WHEELS)/marked.txt
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --dest $(IMAGE_WHEELS) --only-binary=:all: --no-deps \
		--python-version 3.11 --implementation cp --abi cp311 $(IMAGE_PLATFORMS) -r $(IMAGE_WHEELS)/marked.txt
	touch $@

image-wheels: $(IMAGE_WHEELS)/.downloaded ## Download the wheels the images install (build/wheels)

image: $(IMAGE_WHEELS)/.downloaded ## Build $(IMAGE):inference and :full (docker, else buildah; BASE_IMAGE=..., IMAGE_TARGETS=...)
	IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) scripts/build_image.sh $(IMAGE_TARGETS)

image-base: ## A Python 3.11 base image from Debian's packages (for no registry): localhost/debian-python:bookworm
	scripts/image_base.sh
