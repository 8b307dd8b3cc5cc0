# The two set-up commands of the README. Each installs what it needs into .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
REPO ?= model-repository

.PHONY: demo test zoo hostile clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first, pinned: pip must never resolve a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[torch,nlp,dev,mlflow,package,bench,modelopt]'
	# Test-only tools whose metadata pins numpy<2 / protobuf<5 though they run on numpy 2 and
	# protobuf 7: tritonclient 2.51.0 (perf_analyzer for Debian 12; its deps are in the dev extra)
	# and grpcio-tools 1.62.3 (regenerates the committed protobuf modules; see scripts/gen_proto.sh).
	$(BIN)/python -m pip install -q --no-deps tritonclient==2.51.0 grpcio-tools==1.62.3
	touch $@

demo: $(STAMP)
	$(BIN)/serve-kit optimize --recipe digits-cnn --repository $(REPO)
	$(BIN)/serve-kit inspect $(REPO)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Only the model zoo (tests/zoo): serve-kit optimize on real models from PyPI wheels, with real data
# (needs espeak-ng and fonts-dejavu-core from Debian; .ci/run installs them). The larger run with
# figures: $(BIN)/python benchmarks/zoo.py --repeat 2.
zoo: $(STAMP)
	$(BIN)/python -m pytest -q -m zoo tests/zoo

# Only the hostile-input suite (tests/hostile): generated and raw-socket HTTP, gRPC and crafted
# repositories against a real server. The flood figure: $(BIN)/python benchmarks/hostile.py.
hostile: $(STAMP)
	$(BIN)/python -m pytest -q -m hostile tests/hostile

clean:
	rm -rf $(VENV) $(REPO) .pytest_cache
