# make test: a fresh machine to a passing suite. make demo: to a running demo.
# Both create .venv when it is missing or when DEPS changed, then build the extension.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := torch==2.14.1 numpy ninja pybind11 setuptools wheel tqdm pytest traker==0.3.2 scikit-learn scipy matplotlib dattri==0.3.0 transformers==5.24.0 datasets==5.2.0
STAMP := $(VENV)/.deps-$(shell echo '$(DEPS)' | sha1sum | cut -c1-12)
# torch's toolkit detection can pick /usr/local; point it at the real toolkit when present.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2

.PHONY: test demo install info bench peers clean FORCE

$(STAMP):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(DEPS)
	touch $(STAMP)

# The editable install picks up Python changes by itself; rebuild only when the C++/CUDA
# sources or the build files change (or TRAK_FAST_CUDA / TORCH_CUDA_ARCH_LIST do).
BUILT := $(VENV)/.built-$(shell echo '$(TRAK_FAST_CUDA) $(TORCH_CUDA_ARCH_LIST)' | sha1sum | cut -c1-8)
$(BUILT): $(STAMP) setup.py pyproject.toml $(shell find csrc -type f) $(if $(wildcard trak_fast/_C*.so),,FORCE)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	rm -f $(VENV)/.built-*
	touch $(BUILT)

install: $(BUILT)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m trak_fast demo

info: install
	$(PY) -m trak_fast info

bench: install
	$(PY) benchmarks/bench_project.py

# Benchmark-only peers, never imported by trak_fast: kronfluence (bench_lm_lds's EK-FAC) and
# bergson (bench_featurize), each without its own pins (they would replace torch), plus the
# light packages they import.
PEERS := kronfluence==1.0.1 bergson==2.5.1
PEER_DEPS := accelerate einops einconv opt-einsum jaxtyping natsort simple-parsing petname ml_dtypes pyyaml jinja2 torchopt peft
peers: install
	$(PY) -m pip install --quiet --no-deps $(PEERS)
	$(PY) -m pip install --quiet $(PEER_DEPS)
	$(PY) -c "import bergson, kronfluence"

clean:
	rm -rf build trak_fast/_C*.so trak_fast/_build_info.py *.egg-info $(VENV)/.built-*
