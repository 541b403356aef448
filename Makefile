# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install exactly the locked versions (constraints-lock.txt, written by `make lock`).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO ?= demo
DEMO_STEPS ?= 3000
VDEPLOY := $(VENV)/bin/vdeploy
# every extra the development and test environment holds ([gpu] and [tensorrt] need a GPU machine)
EXTRAS := cpu,train,export,openvino,serve,ray,signing,video,dev
LOCK := constraints-lock.txt
# the reference packages of the compatibility tests, installed --no-deps: they declare torchvision,
# which would replace the CPU torch with a CUDA build (their own imports are in [dev]).
REF_06 := video-diffusion-pytorch==0.6.3
REF_07 := video-diffusion-pytorch==0.7.0

.PHONY: install lock demo test test-latest test-ort-oldest bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) pip setuptools wheel
	$(PIP) install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	$(PIP) install -q --no-deps $(REF_06)
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/ref-0.7.0 $(REF_07)
	touch $@

# Re-resolve the lock: pip's resolver over every extra above, for this Python and platform, with the CPU torch
# pinned by constraints-cpu.txt (nothing is installed). Commit the new constraints-lock.txt with the change
# that needed it; `make test` then tests that set everywhere.
lock:
	$(PYTHON) -m pip install --dry-run --ignore-installed -q --report $(VENV)-lock-report.json \
		-c constraints-cpu.txt '.[$(EXTRAS)]' pip setuptools wheel
	$(PYTHON) tools/lock.py $(VENV)-lock-report.json $(LOCK)
	rm -f $(VENV)-lock-report.json

# Drift on purpose: a separate venv with the newest versions pyproject.toml allows (only torch pinned), the
# same suite, and the versions it tested.
test-latest:
	rm -rf $(VENV)-latest
	$(MAKE) VENV=$(VENV)-latest LOCK=constraints-cpu.txt test

# The demo: synthetic captioned shapes -> a tiny text- and frame-conditioned model (16 px, 3000 steps, the demo
# preset's v-prediction with a squared error and standardized caption vectors, half the clips caption-only at the
# noisiest steps: benchmarks/ablation.py's choice; about 10 min on 2 cores) -> checked ONNX export
# -> torch-free sampling (sample.gif: each prompt written under its video) -> parity reports against PyTorch
# (plain and frame-conditioned) -> a continuation of a held-out clip and the measured prompt adherence,
# continuation and interpolation errors against the issue-22 targets (frame_conditioning.md).
demo: install
	$(VDEPLOY) data synth $(DEMO)/data --num 512 --frames 8 --size 16 --seed 0 --overwrite
	$(VDEPLOY) train --data $(DEMO)/data --results $(DEMO)/results --config demo --frame-conditioning --overwrite \
		--steps $(DEMO_STEPS) --save-every $(DEMO_STEPS) --batch-size 8 --lr 2e-3 \
		--ema-start 100 --ema-every 1 --ema-decay 0.99 --text-encoder default --cond-scale 2 --high-noise-share 0.5
	$(VDEPLOY) export --ckpt $(DEMO)/results/model-last.pt --out $(DEMO)/model --cfg
	$(VDEPLOY) sample --model $(DEMO)/model --out $(DEMO)/sample.gif --seed 0 --cond-scale 2 --label \
		--text "a red circle moving left" --text "a blue square moving down" \
		--text "a green triangle moving right" --text "a yellow circle moving up"
	$(VDEPLOY) parity --model $(DEMO)/model --ckpt $(DEMO)/results/model-last.pt \
		--sampler ddpm --cond-scale 2 --json $(DEMO)/parity.json
	$(VDEPLOY) parity --model $(DEMO)/model --ckpt $(DEMO)/results/model-last.pt \
		--sampler ddpm --cond-scale 2 --known 4 --json $(DEMO)/parity_frames.json
	# frame conditioning: continue a held-out synthetic clip from its last 4 frames (the model's trained path, the
	# default sampler), then read colour and direction back from sampled videos (prompt adherence) and score
	# continuations (every sampler) and interpolations
	$(VDEPLOY) data synth $(DEMO)/heldout --num 1 --frames 8 --size 16 --seed 1234 --overwrite
	$(VDEPLOY) sample --model $(DEMO)/model --out $(DEMO)/continuation.gif --seed 0 --cond-scale 2 \
		--init $(DEMO)/heldout/00000.gif --init-frames 4 --text "$$(cat $(DEMO)/heldout/00000.txt)"
	$(PY) benchmarks/frame_conditioning.py --model $(DEMO)/model --samplers dpmpp,ddpm --sampler ddim \
		--md $(DEMO)/frame_conditioning.md --json $(DEMO)/frame_conditioning.json --png $(DEMO)/frame_conditioning.png
	@echo "demo done: $(DEMO)/sample.gif (runtime, no torch), $(DEMO)/continuation.gif, $(DEMO)/results/ (training)," \
		"$(DEMO)/parity.json, $(DEMO)/parity_frames.json, $(DEMO)/frame_conditioning.md (.png)"

# The versions tested are printed first (one line); the suite runs on TEST_WORKERS pytest-xdist workers, a
# test file to a worker (its module fixtures built once); `tests/conftest.py` fails the run on any skip that is not
# a TensorRT or GPU one (VDEPLOY_ALLOW_SKIPS=1 lifts that for local runs of a subset). OpenVINO's tests run in the
# same processes as torch's and onnxruntime's again: the SIGSEGV that had them in a process of their own was
# OpenVINO's CPU plugin unmapping a thread's signal stack (runtime/openvino.py: shared_core; issue 23).
TEST_WORKERS ?= 2
test: install test-ort-oldest
	@$(PY) tools/versions.py
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10

# The fp16 conversion on the OLDEST onnxruntime [cpu] admits (issue 20: converters differ by version), in a
# second, torch-free venv: numpy, onnx and onnxruntime only (tests/test_fp16_export.py loads export/fp16.py by
# path). The newest onnxruntime runs the same file in `test`.
# Every package of that venv is pinned in constraints-ort-oldest.txt.
test-ort-oldest:
	[ -x $(VENV)-ort-oldest/bin/python ] || $(PYTHON) -m venv $(VENV)-ort-oldest
	$(VENV)-ort-oldest/bin/python -m pip install -q -r constraints-ort-oldest.txt
	$(VENV)-ort-oldest/bin/python -m pytest -q --noconftest -p no:cacheprovider tests/test_fp16_export.py

# Per-call numbers first (each section's table printed as it finishes): their timed rounds fit
# BENCH_PER_CALL_BUDGET seconds by the warm-up calls' estimate (15 rounds, or fewer but at least 5; the table says
# how many); the quality section runs only when its estimate fits BENCH_QUALITY_BUDGET seconds (skipped with a
# note otherwise: `make bench BENCH_QUALITY_BUDGET=900 BENCH_PER_CALL_BUDGET=100000` for the full run).
# The export (with its parity checks, minutes on a busy 2-core machine) is kept in bench-out/work for the next run.
BENCH_QUALITY_BUDGET ?= 60
BENCH_PER_CALL_BUDGET ?= 90
bench: install
	$(PY) benchmarks/latency.py --config small --json bench-out/latency.json --plot bench-out/latency.png \
		--work bench-out/work --quality-budget $(BENCH_QUALITY_BUDGET) --per-call-budget $(BENCH_PER_CALL_BUDGET) \
		$(if $(wildcard $(DEMO)/model/vdeploy.json),--ckpt $(DEMO)/model)

clean:
	rm -rf $(VENV) $(VENV)-latest $(VENV)-ort-oldest $(DEMO) bench-out
