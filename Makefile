# The project's front door. `make demo` serves a demo; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: venv demo serve scheduler test lint format bench bench-quality clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: venv
	scripts/demo.sh

serve: venv
	$(VENV)/bin/gunicorn -c gunicorn.conf.py 'app:create_app()'

scheduler: venv
	$(PY) -m jobs.scheduler

test: venv
	scripts/ensure-redis-server.sh
	scripts/ensure-spark-deps.sh
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check app models jobs tests bench

format: venv
	$(VENV)/bin/ruff format app models jobs tests bench

bench: venv
	$(PY) bench/serve.py
	$(PY) bench/train_scale.py
	$(PY) bench/events.py
	$(PY) bench/online.py
	$(PY) bench/search.py
	$(PY) bench/cluster.py
	$(PY) bench/train_spark.py

bench-quality: venv
	$(PY) bench/quality.py

clean:
	rm -rf $(VENV) var
