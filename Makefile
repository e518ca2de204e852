# `make test` and `make demo` work on a fresh machine: each builds .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch, pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: test demo translate digits tour lint clean venv bench-decode bench-serve

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,serve]"
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

# Batch-1 decoding against llama.cpp on the same weights (docs/benchmarks.md). Installs the optional
# reference first: llama-cpp-python builds llama.cpp from source (several minutes on 2 cores, once), and its
# source distribution carries llama.cpp's own converter, unpacked under .cache/llama.cpp. llama.cpp is built
# for this CPU (its default, GGML_NATIVE), without the multimodal library the benchmark does not use.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_SRC := .cache/llama.cpp
LLAMA_CMAKE_ARGS ?=  # more llama.cpp build options, e.g. -DGGML_AVX512=OFF
$(LLAMA_CPP_SRC)/convert_hf_to_gguf.py: $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[test,serve,bench-llamacpp]"
	rm -rf .cache/llama-sdist && mkdir -p .cache/llama-sdist $(LLAMA_CPP_SRC)
	$(PY) -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_VERSION)" -d .cache/llama-sdist
	tar xzf .cache/llama-sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_CPP_SRC) --strip-components 3 \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/gguf-py
	rm -rf .cache/llama-sdist

bench-decode: $(LLAMA_CPP_SRC)/convert_hf_to_gguf.py
	$(PY) benchmarks/generate_throughput.py --models llama --batches 1,8 --new-tokens 128 --prompt-speed 512 --llamacpp

# Serving load test against llama.cpp's own C++ server (docs/serving.md): builds llama-server from the same
# source distribution (cmake, target llama-server only; about 10 minutes on 2 cores, once) under .cache/llama-server.
LLAMA_SERVER_SRC := .cache/llama-server/src
LLAMA_SERVER := $(LLAMA_SERVER_SRC)/build/bin/llama-server
$(LLAMA_SERVER): $(LLAMA_CPP_SRC)/convert_hf_to_gguf.py
	rm -rf .cache/llama-server && mkdir -p $(LLAMA_SERVER_SRC)
	$(PY) -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_VERSION)" -d .cache/llama-server
	tar xzf .cache/llama-server/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_SERVER_SRC) --strip-components 3 \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp
	cmake -S $(LLAMA_SERVER_SRC) -B $(LLAMA_SERVER_SRC)/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
		-DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $(LLAMA_CMAKE_ARGS)
	cmake --build $(LLAMA_SERVER_SRC)/build --target llama-server -j$$(nproc)

bench-serve: $(LLAMA_SERVER)
	$(PY) benchmarks/serve_load.py --model llama --levels 1,4,16 --requests 4,12,32 --llama-server $(LLAMA_SERVER)

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
