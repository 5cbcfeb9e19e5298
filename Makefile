# The two commands of the README:  `make repro` (set up, run the pipeline)  and  `make test`.
# TORCH picks the PyTorch build installed before the project: the default is the CPU build
# this project is tested with; use TORCH=torch for your platform's newest wheel (CUDA on GPU machines).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# The interpreter .venv is made with (PYTHON=python3.12 names another); it must meet pyproject's
# requires-python, read from there.
PYTHON ?= python3
MIN_PYTHON := $(or $(shell sed -n 's/^requires-python *= *">= *\([0-9.]*\)".*/\1/p' pyproject.toml),3.10)
# exits 0 when the python it runs under is at least MIN_PYTHON
PY_NEW_ENOUGH := -c 'import sys; sys.exit(sys.version_info[:2] < tuple(map(int, "$(MIN_PYTHON)".split("."))))'

.PHONY: setup horovod repro test test-timings test-gpu lint bench bench-gpu clean-runs clean-store

# The page template `dvc plots show` fills (.dvc/config.local: plots.html_template), with vega inlined.
PLOTS_TEMPLATE := .cache/plots/offline.html

setup: $(VENV)/.installed $(PLOTS_TEMPLATE)
	@# this checkout's DVC points at the template (a clone without it keeps DVC's own page); every
	@# time, as a .dvc/config.local made for another setting would otherwise keep it from being named
	$(PY) -m dvc config --local plots.html_template ../$(PLOTS_TEMPLATE)

# Horovod is built from source against the installed torch (scripts/build_horovod.sh says why);
# the wheel is cached in ~/.cache/pipeline-wheels, so only the first build takes minutes.
# A python3 older than requires-python stops here in one line (pip would fail later on torch with
# ResolutionImpossible); a .venv left by an older (or removed) interpreter is recreated, not reused.
$(VENV)/.installed: pyproject.toml scripts/build_horovod.sh
	@$(PYTHON) $(PY_NEW_ENOUGH) 2>/dev/null || { echo "make setup needs Python >= $(MIN_PYTHON) (pyproject's \
	requires-python); $(PYTHON) is $$($(PYTHON) --version 2>/dev/null || echo "not found"): install a newer Python and \
	name it, e.g. make setup PYTHON=python3.12"; exit 1; }
	@if [ -e $(VENV) ] && ! $(PY) $(PY_NEW_ENOUGH) 2>/dev/null; then \
	  echo "$(VENV) was made by $$($(PY) --version 2>/dev/null || echo "an interpreter that is gone"), not Python >= \
	$(MIN_PYTHON): recreating it"; $(PYTHON) -m venv --clear $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	scripts/build_horovod.sh $(PY)
	touch $@

horovod:
	scripts/build_horovod.sh $(PY)

# DVC's plot page loads vega from a CDN, so offline (a cluster node, a train) its curves stay blank:
# the versions DVC names are fetched once with npm and inlined. Without npm or its registry this
# says so and keeps DVC's page (the plots then need internet); setup goes on.
$(PLOTS_TEMPLATE): scripts/offline_plots.py $(VENV)/.installed
	$(PY) scripts/offline_plots.py --out $@

repro: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro
	@echo ""
	@echo "Done. Where to look:"
	@echo "  metrics:  $(VENV)/bin/dvc metrics show"
	@echo "  plots:    $(VENV)/bin/dvc plots show   (writes dvc_plots/index.html: loss curves, digit samples; opens offline)"
	@echo "  reports:  reports/lm/loss.png   reports/diffusion/loss.png   reports/diffusion/samples.png   reports/lm/sample.txt"
	@echo "  MLflow:   $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1"
	@echo "  models:   export/lm  export/diffusion   (registry: models:/pipeline-lm@champion, models:/pipeline-diffusion@champion)"

# Two test processes (pytest-xdist): a Ray or DVC test waits on process starts and polls for a good
# part of its time, which the other process fills. A module's tests stay together (its fixtures are
# built once), longest module first (tests/conftest.py; xdist's own reordering is off). TEST_WORKERS=0
# runs them one after another in one process, TEST_WORKERS=auto one per core.
TEST_WORKERS ?= 2
PYTEST_SUITE = PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m "not gpu" \
	-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
# Every run leaves a JUnit report (.test-timings.xml, git-ignored) the module times come from.
test: setup
	$(PYTEST_SUITE) --durations=25 --junitxml=.test-timings.xml

# The whole suite, then tests/module_seconds.json from its JUnit report: the module times `make
# test` orders its modules by. Rerun it when a module's time changes by minutes (or, after any
# `make test`: python scripts/module_seconds.py .test-timings.xml > tests/module_seconds.json).
test-timings: test
	$(PY) scripts/module_seconds.py .test-timings.xml > tests/module_seconds.json.tmp
	mv tests/module_seconds.json.tmp tests/module_seconds.json

# On a CUDA machine (set up with TORCH=torch): the gpu-marked tests, torchao for fp8 installed first.
test-gpu: setup
	$(PY) -m pip install --quiet -e '.[gpu]'
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m gpu tests/gpu

bench-gpu: setup
	$(PY) -m pip install --quiet -e '.[gpu]'
	$(PY) benchmarks/gpu.py

lint: setup
	$(VENV)/bin/ruff check pipeline stages tests benchmarks scripts

bench: setup
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/strategies.py
	$(PY) benchmarks/activation_checkpointing.py
	$(PY) benchmarks/cluster.py
	$(PY) benchmarks/data.py
	PYTHONPATH=. $(PY) benchmarks/model_parallel.py

# Ray Train's run folders (checkpoints) only: the MLflow store (mlruns.db, mlartifacts) holds the
# registered models that registry/<task>.json and models/ point at, so it is not touched here.
clean-runs:
	rm -rf runs

# The MLflow store (runs, logged models, the registry and its champion aliases) and registry/, the
# register stage's outputs that name it, so DVC sees them missing; nothing else is kept that names
# the store, so `dvc repro --force` rebuilds it. Asks for CONFIRM=1: registered versions are lost.
clean-store:
	@if [ "$(CONFIRM)" != 1 ]; then echo "clean-store deletes mlruns.db, mlartifacts/ and registry/ (every \
	MLflow run and registered model version, for good): run make clean-store CONFIRM=1"; exit 1; fi
	rm -rf mlruns.db mlartifacts registry
	@echo "removed the MLflow store and registry/: rebuild both with dvc repro --force (re-runs every stage; \
	a run whose Ray checkpoints are still under runs/ resumes instead of training again)"
