# Every target does its own set-up on a fresh machine: a .venv with the package and its deps.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ganprint-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: test demo bench completions clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,faiss]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/ganprint demo --out demo-out

completions: $(STAMP)
	$(PY) completions/generate.py

bench: $(STAMP)
	$(PY) bench/embed_throughput.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
