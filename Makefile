# `make test` and `make demo` work on a fresh machine: each builds .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch, pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: test demo translate digits tour lint clean venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q -ra

# The main job: train a small Llama-style model on the embedded corpus (about 8 minutes on 2 cores), then
# sample Python from it (examples/demo.yaml; docs/training.md explains the recipe).
# Running it again resumes the run in runs/demo (or, once finished, evaluates and samples again).
demo: $(VENV)/.installed
	$(VENV)/bin/formerkit train --config examples/demo.yaml

# The original encoder-decoder Transformer, scaled down, learns to write numbers in English words
# ("412" -> "four hundred twelve") from a synthetic task the library generates (about 10 minutes on 2 cores);
# it ends with the held-out exact match, BLEU and chrF and a few example translations (docs/translation.md).
translate: $(VENV)/.installed
	$(VENV)/bin/formerkit train --config examples/translate.yaml

# A small Vision Transformer learns scikit-learn's 8x8 handwritten digits on the CPU (under 5 minutes);
# it ends with the held-out test accuracy and runs/digits/confusion_matrix.png (docs/vision.md).
digits: $(VENV)/.installed
	$(VENV)/bin/formerkit train --config examples/digits.yaml

# A tour of the library: every preset, and the real all-MiniLM-L6-v2 checkpoint embedding sentences.
tour: $(VENV)/.installed
	$(VENV)/bin/formerkit tour

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
