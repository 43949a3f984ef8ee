# One-command set-up on a fresh machine: `make run` and `make test` create .venv themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU machines take the CPU build of torch first so that no dependency pulls a multi-GB CUDA
# build. On a GPU machine: make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
# chromium: the headless browser that the metasep serve test drives (through Playwright).
# g++: torch.compile builds the fused TCN blocks with it on a CPU (the tests) and Triton its
# launchers on a GPU.
APT_PACKAGES := ffmpeg fluidsynth fluid-soundfont-gm timgm6mb-soundfont chromium g++
SYSTEM_TOOLS := ffmpeg ffprobe fluidsynth chromium g++
# The General MIDI SoundFonts `metasep synth` renders with (Debian packages fluid-soundfont-gm
# and timgm6mb-soundfont).
SOUNDFONTS := /usr/share/sounds/sf2/FluidR3_GM.sf2 /usr/share/sounds/sf2/TimGM6mb.sf2

.PHONY: run test test-fast lint format system-deps clean

run: $(VENV)/.installed
	$(BIN)/metasep demo

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# The edit-test loop: the unit tests, without the ones marked slow (those that start Prefect, a Ray
# cluster, a server or a browser, and the few long ones; see tests/conftest.py). `make test` and
# CI still run everything.
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not slow" -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	for font in $(SOUNDFONTS); do [ -f $$font ] || missing="$$missing $$font"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing system packages: $(APT_PACKAGES)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	  else \
	    echo "missing:$$missing. Install them with:"; \
	    echo "  sudo apt-get install -y $(APT_PACKAGES)"; exit 1; \
	  fi; \
	fi

$(VENV)/.base: | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.base
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt $(VENV)/.base
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
