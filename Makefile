# Two commands: `make demo` (the whole story on the embedded cohort) and `make test`
# (`make test-fast` leaves out the slow tests).
# Each creates .venv from requirements.txt when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export MPLBACKEND := Agg
# OpenMP threads sleep instead of spinning while they wait: on a shared or busy CPU, spinning
# threads made training up to 10x slower here.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-fast venv experiment benchmark clean-runs

# The pinned set, then the package itself, editable and without its loose dependencies (the pins
# rule): `import ssl_utils` and the commands ssl-prepare, ssl-bundle, ssl-study, ssl-demo work from
# any folder, in notebooks and in torchrun workers alike.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

# what CI runs (.ci/run)
test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# the inner loop: everything but the tests marked slow (notebooks, torchrun processes, whole runs)
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

demo: $(VENV)/.installed
	$(PY) -m ssl_utils.demo --out runs/demo

experiment: $(VENV)/.installed
	$(PY) -m ssl_utils.study --out runs/study --preset demo --seeds 5 $(STUDY_ARGS)

benchmark: $(VENV)/.installed
	$(PY) benchmarks/run.py --out runs/benchmark

clean-runs:
	rm -rf runs
