# The two quickstart commands: `make demo` and `make test`. Each sets up .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test chromium lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned, so that no CUDA build is pulled in by a range.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/minimind demo

test: $(STAMP) chromium
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

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/model.py
	$(PY) bench/data.py

clean:
	rm -rf $(VENV) build dist *.egg-info
