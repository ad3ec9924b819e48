# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

# SQLAlchemy 2.0 and 2.1 are both supported: the database tests also run on 2.0 in a venv of its own.
SA20_VENV ?= .venv-sqlalchemy20
SA20_STAMP := $(SA20_VENV)/.installed-dev
DB_TESTS := tests/sources/test_sqlalchemy.py tests/sources/test_sqlalchemy_findings.py \
	tests/sources/test_sqlalchemy_pool.py tests/sources/test_sqlalchemy_sessions.py \
	tests/sources/test_sql_shapes.py tests/sources/test_asyncpg.py \
	tests/sources/test_sqlalchemy_statements.py

.PHONY: demo test test-sqlalchemy-2.0 lint format bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "asyncsentinel needs Python 3.11+; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/asyncsentinel demo

test: $(STAMP) lint
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-sqlalchemy-2.0

$(SA20_STAMP): pyproject.toml
	$(PYTHON) -m venv $(SA20_VENV)
	$(SA20_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SA20_VENV)/bin/python -m pip install --quiet -e '.[dev]' 'sqlalchemy[asyncio]>=2.0,<2.1'
	@touch $(SA20_STAMP)

test-sqlalchemy-2.0: $(SA20_STAMP)
	@$(SA20_VENV)/bin/python -c 'import sqlalchemy; print("SQLAlchemy", sqlalchemy.__version__)'
	$(SA20_VENV)/bin/python -m pytest -q $(DB_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(SA20_VENV) .pytest_cache .mypy_cache .ruff_cache
