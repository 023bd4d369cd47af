# The two set-up commands: `make demo` and `make test`. Both create .venv if it is
# missing and install the project (with its test extra) into it first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlab demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy vdev/virtio
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/vlab bench blk

clean:
	rm -rf $(VENV) build *.egg-info
