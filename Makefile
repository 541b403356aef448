# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need (CPU torch pinned by constraints-cpu.txt).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO ?= demo

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-cpu.txt -e '.[cpu,train,export,dev]'
	# reference package for the compatibility tests; --no-deps: it declares torchvision,
	# which would replace the CPU torch with a CUDA build.
	$(PIP) install -q --no-deps video-diffusion-pytorch==0.6.3
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/ref-0.7.0 video-diffusion-pytorch==0.7.0
	touch $@

demo: install
	$(VENV)/bin/vdeploy data synth $(DEMO)/data --num 64 --frames 8 --size 32
	$(VENV)/bin/vdeploy train --data $(DEMO)/data --results $(DEMO)/results --config tiny

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/latency.py --config small --json bench-out/latency.json --plot bench-out/latency.png

clean:
	rm -rf $(VENV) $(DEMO) bench-out
