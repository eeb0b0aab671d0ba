# flightlog: `make dev` runs the platform, `make test` runs every test against real servers.
# Both set up everything themselves on a fresh Debian 12 machine (Python 3.11, Java 17, Maven):
# the virtualenv, Kafka's jars, MariaDB and Dovecot from Debian packages, schemas and topics.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FLIGHTLOG := $(VENV)/bin/flightlog
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install stack dev down test test-unit lint format mypy all clean bench

help:
	@echo "make dev      bring up Kafka, MariaDB, Dovecot, schemas, topics and the four services"
	@echo "make test     the same set-up, then every test against the real servers"
	@echo "make down     stop the services and the stack"
	@echo "make lint | format | mypy | all"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

stack: install
	$(FLIGHTLOG) stack up
	$(FLIGHTLOG) db migrate
	$(FLIGHTLOG) topics create

dev: install
	$(FLIGHTLOG) dev

down: install
	$(FLIGHTLOG) down

# The services `make dev` started would hold the change relay's and the webhook dispatcher's
# leader locks that the tests' own processes must win, so they are stopped first.
# Coverage of libs, services and cli, the service processes included, is one line after the
# tests; the target's exit status is pytest's.
test: stack
	$(FLIGHTLOG) services down
	@rm -f .coverage .coverage.*
	@status=0; $(PY) -m coverage run -m pytest $(PYTEST_ARGS) || status=$$?; \
	$(PY) -m coverage combine -q >/dev/null 2>&1 && \
	echo "coverage: $$($(PY) -m coverage report --format=total) % of libs, services, cli"; \
	exit $$status

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check libs services cli tests
	$(VENV)/bin/ruff format --check libs services cli tests

format: install
	$(VENV)/bin/ruff check --fix libs services cli tests
	$(VENV)/bin/ruff format libs services cli tests

mypy: install
	$(VENV)/bin/mypy libs services cli tests

all: lint mypy test

clean: down
	rm -rf .state

bench: install
	$(FLIGHTLOG) bench --write-md
