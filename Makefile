# Titanax developer commands. `make example` and `make test` each install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= dev,examples

.PHONY: setup test example lint typecheck bench docs clean

setup: $(STAMP)

# uv is the installer; plain pip is the fallback where uv cannot be had.
$(STAMP): pyproject.toml
	@if command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv >/dev/null 2>&1; then \
	  UV="$$(command -v uv || echo $(PYTHON) -m uv)"; \
	  $$UV venv -q --allow-existing --python $(PYTHON) $(VENV) && \
	  $$UV pip install -q --python $(BIN)/python -e '.[$(EXTRAS)]'; \
	else \
	  $(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q -e '.[$(EXTRAS)]'; \
	fi
	@touch $(STAMP)

test: lint typecheck
	$(BIN)/python -m pytest -q -n 2 --dist loadfile  # two workers; a file stays on one (its fixtures run once)

example: setup
	$(BIN)/python examples/mnist_dp/train.py

lint: setup
	$(BIN)/ruff check titanax tests examples conftest.py
	$(BIN)/ruff format --check titanax tests examples conftest.py

typecheck: setup
	$(BIN)/mypy titanax

bench: setup
	$(BIN)/python tests/benchmarks/report.py $(if $(GPU),--gpu)

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
