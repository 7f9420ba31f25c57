# make demo: set up .venv and run the whole path on a generated texture category (~8 min, 2 cores)
# make test: set up .venv and run the test suite (real local Ray, moto S3 server, Ray Serve)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.lasb-installed

export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export AWS_EC2_METADATA_DISABLED := true

.PHONY: install demo test lint clean

install: $(STAMP)

# torch first, pinned: this pin takes the CPU build; an unpinned torch pulls a multi-GB CUDA build
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/lasb demo --out demo_out

test: install
	$(PY) -m pytest -q -ra

lint: install
	$(VENV)/bin/ruff check lasb jobs serve tests benchmarks

clean:
	rm -rf $(VENV) demo_out runs reports .pytest_cache
