# The two commands a user needs: `make demo` and `make test`. Both install what they need
# (Debian packages, kernel headers for BCC, a virtualenv that sees Debian's bcc).
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint host clean-lab

demo: host $(STAMP)
	$(BIN)/ambient-agent demo

test: host $(STAMP) lint
	$(BIN)/python -m pytest -ra tests

lint: $(STAMP)
	$(BIN)/ruff check agent cni lab bench tests
	$(BIN)/ruff format --check agent cni lab bench tests
	$(BIN)/mypy

host:
	@bash scripts/bootstrap-host.sh

# --system-site-packages: bcc is Debian's python3-bpfcc, built for /usr/bin/python3.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

clean-lab: $(STAMP)
	$(BIN)/ambient-agent lab down
