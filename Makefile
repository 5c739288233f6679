# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates ./.venv and installs with pip when needed (torch from the pinned release).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.peftlite-installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,demo,peft,lycoris]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m peftlite.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) demo_out .pytest_cache .hypothesis
