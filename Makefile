# flightlog: `make dev` runs the platform, `make test` runs every test against real servers.
# Both set up everything themselves on a fresh Debian 12 machine (Python 3.11, Java 17, Maven, Go):
# the virtualenv, Kafka's jars, MariaDB and Dovecot from Debian packages, schemas and topics.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FLIGHTLOG := $(VENV)/bin/flightlog
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install kube-score stack dev down test test-unit lint format mypy check constraints all clean bench

help:
	@echo "make dev      bring up Kafka, MariaDB, Dovecot, schemas, topics and the four services"
	@echo "make test     the same set-up, then every test against the real servers"
	@echo "make down     stop the services and the stack"
	@echo "make check    lint, types and the configuration document (what CI runs first)"
	@echo "make lint | format | mypy | constraints | all"

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# kube-score (a Go program: `go install` builds it from the Go module proxy) lints the rendered
# Kubernetes manifests in tests/unit/test_deploy_files.py; kept in the venv's bin, built for the
# tests only (`make dev` does not need it). That test builds it too when it is missing.
KUBE_SCORE_VERSION := v1.20.0
GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)

$(VENV)/.kube-score-$(KUBE_SCORE_VERSION): $(VENV)/.installed
	GOBIN=$(abspath $(VENV))/bin $(GO) install github.com/zegl/kube-score/cmd/kube-score@$(KUBE_SCORE_VERSION)
	touch $@

install: $(VENV)/.installed

kube-score: $(VENV)/.kube-score-$(KUBE_SCORE_VERSION)

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
test: stack kube-score
	$(FLIGHTLOG) services down
	@rm -f .coverage .coverage.*
	@status=0; $(PY) -m coverage run -m pytest $(PYTEST_ARGS) || status=$$?; \
	$(PY) -m coverage combine -q >/dev/null 2>&1 && \
	echo "coverage: $$($(PY) -m coverage report --format=total) % of libs, services, cli"; \
	exit $$status

test-unit: install kube-score
	$(PY) -m pytest tests/unit tests/mime_corpus $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check libs services cli tests examples
	$(VENV)/bin/ruff format --check libs services cli tests examples

format: install
	$(VENV)/bin/ruff check --fix libs services cli tests examples
	$(VENV)/bin/ruff format libs services cli tests examples

mypy: install
	$(VENV)/bin/mypy libs services cli tests examples

# What CI runs before the tests: lint, types and the generated documents (configuration, topic
# schemas).
check: lint mypy
	$(PY) -m cli.config_docs --check
	$(PY) -m cli.topic_schemas --check

# Pin what the tests pass with: a fresh venv from pyproject.toml alone, frozen.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q --upgrade pip
	.venv-constraints/bin/python -m pip install -q -e '.[dev]'
	{ sed -n '1,2p' constraints.txt; .venv-constraints/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-constraints

all: check test

clean: down
	rm -rf .state

bench: install
	$(FLIGHTLOG) bench --write-md
