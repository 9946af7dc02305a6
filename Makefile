# The two set-up commands of the README, and a few conveniences.
# Everything installs into .venv (created here); nothing is assumed installed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: quickstart test install install-test redis serve proto clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is pinned in pyproject.toml to 2.13.0, which resolves to the CPU build
# on CPU-only machines (and to the CUDA build where pip is set up for it).
install: $(VENV)/bin/activate
	$(PIP) install -q -e .

install-test: $(VENV)/bin/activate
	$(PIP) install -q -e '.[test]'

# Serve SmolLM2 (pulled on first use), answer a sample request over HTTP with
# the OpenAI client and over gRPC with `kvmesh generate`, then keep serving.
quickstart: install
	$(PIP) install -q openai
	bash deploy/quickstart.sh

# The Redis discovery tests start their own redis-server on a free loopback
# port; this only makes sure the binary is there (Debian package).
redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package redis-server)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

# The whole test suite (CI runs exactly this through .ci/run).
test: install-test redis
	$(PY) -m pytest -q -ra

serve: install
	$(VENV)/bin/kvmesh serve

proto: install-test
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info
