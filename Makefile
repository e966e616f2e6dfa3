# The two commands a new user needs (see README): `make main` and `make test`.
# Both create .venv and install keffconvert into it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: main test install bench table2

$(BIN)/keffconvert: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/keffconvert

# Convert EfficientNet-B0, train it and its kEffNet on scikit-learn's digits (CPU), write the report.
main: install
	$(BIN)/keffconvert train efficientnetb0 --data digits --image-size 32 --epochs 30 --with-original --out runs/main

# The suite runs on TEST_WORKERS pytest-xdist processes: `worksteal` hands each worker half of the
# tests in file order (a module-scoped fixture is built on each worker that runs its tests) and
# moves queued tests to a worker that runs out. `make test TEST_WORKERS=0` runs in one process.
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: install
	$(BIN)/python benchmarks/bench_speed.py --out benchmarks/results.json

table2: install
	$(BIN)/python examples/table2.py
