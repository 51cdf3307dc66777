# Two commands do all of the set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test bench clean browser

# torch and torchvision go in first, pinned, so the project's ranges install nothing bigger (-qq: errors only).
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -qq -c constraints.txt -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/dalle2 demo $(ARGS)

# The report's browser test renders report.html in headless Chromium: installed here where we may (root on
# Debian); elsewhere that one test says it is skipped and why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && timeout 300 apt-get update -qq >/dev/null 2>&1 && \
	    timeout 600 apt-get install -y -qq chromium >/dev/null 2>&1 && echo "installed chromium"; } || \
	  echo "no Chromium (apt-get install chromium): the report's browser test will be skipped"

test: $(BIN)/.installed browser
	$(BIN)/python -m pytest $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) runs
