# The two quickstart commands: `make demo` and `make test`. Each sets up .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test chromium llamacpp lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned, so that no CUDA build is pulled in by a range.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/minimind demo

test: $(STAMP) chromium llamacpp
	$(PY) -m pytest

# The web UI's browser test drives Debian's chromium. On a fresh Debian machine as root (CI),
# install it quietly; elsewhere say why not, and the test skips with that reason.
chromium:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium (for tests/test_web.py)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends chromium >/dev/null) \
	      || echo "chromium could not be installed: the browser test will skip"; \
	  else \
	    echo "no /usr/bin/chromium and no root apt-get: the browser test will skip"; \
	  fi; }

# llama-cpp-python runs the GGUF parity tests (tests/test_gguf.py, marker llamacpp). It builds
# llama.cpp from source (about 6 minutes on 2 cores), so the wheel is built once into a cache
# outside the clone (WHEELS) and reused by every later clone on the machine. A build that fails
# says so, and those tests skip with the reason.
WHEELS ?= $(HOME)/.cache/minimind/wheels
llamacpp: $(STAMP)
	@$(PY) -c "import llama_cpp" 2>/dev/null || { \
	  ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || { \
	    echo "building llama-cpp-python into $(WHEELS) (once; about 6 minutes)"; \
	    $(PY) -m pip wheel -q --no-deps --wheel-dir $(WHEELS) 'llama-cpp-python>=0.3' \
	      || echo "llama-cpp-python could not be built: the llama.cpp tests will skip"; }; \
	  for w in $(WHEELS)/llama_cpp_python-*.whl; do \
	    test -f "$$w" && $(PY) -m pip install -q "$$w" \
	      || echo "no llama-cpp-python wheel: the llama.cpp tests will skip"; \
	  done; }

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/model.py
	$(PY) bench/data.py

clean:
	rm -rf $(VENV) build dist *.egg-info
