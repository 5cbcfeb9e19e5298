# The two commands of the README:  `make repro` (set up, run the pipeline)  and  `make test`.
# TORCH picks the PyTorch build installed before the project: the default is the CPU build
# this project is tested with; use TORCH=torch for your platform's newest wheel (CUDA on GPU machines).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup horovod repro test test-gpu lint bench bench-gpu clean-runs

# The page template `dvc plots show` fills (.dvc/config.local: plots.html_template), with vega inlined.
PLOTS_TEMPLATE := .cache/plots/offline.html

setup: $(VENV)/.installed $(PLOTS_TEMPLATE)
	@# this checkout's DVC points at the template (a clone without it keeps DVC's own page); every
	@# time, as a .dvc/config.local made for another setting would otherwise keep it from being named
	$(PY) -m dvc config --local plots.html_template ../$(PLOTS_TEMPLATE)

# Horovod is built from source against the installed torch (scripts/build_horovod.sh says why);
# the wheel is cached in ~/.cache/pipeline-wheels, so only the first build takes minutes.
$(VENV)/.installed: pyproject.toml scripts/build_horovod.sh
	python3 -m venv $(VENV)
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
# built once). TEST_WORKERS=0 runs them one after another in one process, TEST_WORKERS=auto one per core.
TEST_WORKERS ?= 2
test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m "not gpu" --durations=25 \
		-n $(TEST_WORKERS) --dist loadscope

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

clean-runs:
	rm -rf runs mlruns.db mlartifacts
