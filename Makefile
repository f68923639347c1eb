# Two commands a newcomer needs: `make serve` and `make test`. Each creates
# .venv on first use with the system python3, so nothing is installed by hand.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint check clean bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/agentjobs serve $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check agentjobs tests benchmarks
	$(BIN)/ruff format --check agentjobs tests benchmarks
	$(BIN)/mypy agentjobs

check: lint test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# -- single-file distributions (docs/deployment.md) -----------------------------------
# `make zipapp`: dist/agentjobs.pyz, a shiv zipapp (~10-18 s, ~2.5 MiB; needs python3 of
# the same minor version on the target). `make binary`: dist/agentjobs, a PyInstaller
# one-file executable (~45-55 s, ~28 MiB; no Python needed on the target; not run in CI).
# `make dist`: both. The build tools are in the `dev` extra; the targets install them into
# the venv if missing, so they never become runtime dependencies.
.PHONY: dist zipapp binary
DIST ?= dist
ZIPAPP_PYTHON ?= /usr/bin/env python3

$(BIN)/shiv: $(STAMP)
	test -x $@ || $(BIN)/pip install -q 'shiv>=1.0.8,<2'

$(BIN)/pyinstaller: $(STAMP)
	test -x $@ || $(BIN)/pip install -q 'pyinstaller>=6.22,<7'

zipapp: $(BIN)/shiv
	mkdir -p $(DIST)
	rm -rf build/lib  # setuptools' in-tree build dir: never ship stale modules
	$(BIN)/shiv --quiet --reproducible --compressed -p '$(ZIPAPP_PYTHON)' \
		-e agentjobs.cli:main -o $(DIST)/agentjobs.pyz .
	@ls -l $(DIST)/agentjobs.pyz

binary: $(BIN)/pyinstaller
	mkdir -p $(DIST) build/pyinstaller
	printf 'import sys\nfrom agentjobs.cli import main\nsys.exit(main())\n' \
		> build/pyinstaller/agentjobs_main.py
	$(BIN)/pyinstaller --noconfirm --clean --log-level WARN --onefile --name agentjobs \
		--paths $(CURDIR) --collect-submodules agentjobs --distpath $(DIST) \
		--workpath build/pyinstaller --specpath build/pyinstaller \
		build/pyinstaller/agentjobs_main.py
	@ls -l $(DIST)/agentjobs

dist: zipapp binary
