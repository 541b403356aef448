#!/usr/bin/env bash
# Every GPU check of vdeploy in one call, in under 8 minutes of a fresh GPU machine, into one folder:
#
#     benchmarks/gpu.sh OUT_DIR
#     benchmarks/gpu.sh --stash                           # keep .device/a's onnxruntime-gpu part in /tmp (call 1)
#     DEVICE=cpu QUICK=1 benchmarks/gpu.sh /tmp/gpu-dry     # the plumbing on a machine without a GPU
#
# onnxruntime-gpu on the H200 machine (../shared/gpu/README.md; make-carry.sh splits it into .device/a and
# .device/b, and a call that carries .device/b drops .device/a): call 1 carries .device/a and runs
# `benchmarks/gpu.sh --stash`, which copies its part to $PARTS (/tmp/vdeploy-parts); call 2 carries .device/b and
# .device/whl and runs `benchmarks/gpu.sh OUT`, which joins the parts (.device/a if it is there, else $PARTS, then
# .device/b), unpacks onnxruntime-gpu into /tmp/ort, installs .device/whl into /tmp/site and sets LD_LIBRARY_PATH
# (the image's nvidia-* CUDA libraries) and PYTHONPATH, as device-env.sh does. Nothing of this with DEVICE=cpu.
#
# Steps (each under its own timeout; a step that fails or times out is recorded and the next one runs):
#   env      GPU, driver, python, torch/CUDA, onnxruntime and its providers, cupy, ... (first lines printed)
#   (warm)   in the background from here on, on the upper half of the CPU cores: torch.compile of base under
#            autocast fp16 at batch 1 and 4 (80-100 s per shape), so that the compile step finds inductor's cache
#            warm; the steps in the foreground run on the lower half (OUT/compile-warm.log)
#   parity   benchmarks/gpu_parity.py: a random tiny model, parity (dpmpp 13 steps, ddpm 100) on onnxruntime
#            CPU fp32 and on the device at fp32, tf32 (judged by atol) and fp16 (by video PSNR); one call per
#            precision vs onnxruntime CPU
#   latency  benchmarks/latency.py --config base --batches 1,4,8: torch eager, autocast fp16/bf16, the
#            runtime at fp32/tf32/fp16 with CUDA graphs (the default), without, and channels-last (nhwc), error
#            vs torch fp32, GPU memory; the sampling section (time outside the denoiser, host loop)
#   device   benchmarks/gpu_device.py: the device-resident loop (samplers on CuPy, IO binding, CUDA graph,
#            prefetched noise) against the host loop on the base export, dpmpp 13 and ddpm 100: ms per step,
#            share outside the denoiser, video difference, the device run's costliest Python functions
#   serve    benchmarks/serve_load.py --quick (batching on/off/auto) where the [serve] extra imports
#   compile  after the warm-up (waited for at most W_WARM s, then stopped): torch.compile under autocast fp16
#            beside torch eager (fp32, fp16) and the runtime (fp32, fp16) at batch 1 and 4, one run
#   fp16     benchmarks/gpu_fp16_choice.py --device cuda: the converter's fp16 graph against a half-precision
#            torch export of base (the latency step's export reused), dpmpp 13 steps: video PSNR, ms per call
#            at batch 1 and 4
#   kernels  benchmarks/gpu_kernels.py: the GPU time of a base call at batch 4 by kernel kind (fp16, tf32; the
#            converter's graph and the half-precision export)
#   summary  OUT/summary.json and OUT/summary.md from all of the above, with each step's status and seconds
# Every step writes OUT/<step>.log; OUT/steps.jsonl has one line per step (rc 124: timed out).
#
# Python: $PYTHON, else the checkout's .venv, else python3. Where vdeploy does not import, the checkout is put
# on the path through a folder of links. STEPS=latency,device runs only the steps named (env always runs);
# ROWS and BATCHES replace the latency step's rows and batch sizes, LATENCY_SKIP its --skip list.
# Timeouts: T_PARITY, T_LATENCY, T_DEVICE, T_SERVE, T_COMPILE, T_FP16, T_KERNELS, W_WARM (the wait for the warm-up) (s);
# BUDGET (default 440 s; with the 30 s summary under 8 min) caps the whole run: a step gets at most what is left.
# DEVICE=cpu runs the same steps on the CPU; QUICK=1 shrinks them (tiny configs, fewer rounds) to check the
# script itself.
set -uo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
carry=${DEVICE_DIR:-$root/.device}  # make-carry.sh's parts: a/ort.part00, b/ort.part01, whl/*.whl
parts=${PARTS:-/tmp/vdeploy-parts}
if [[ $1 == --stash ]]; then
    shopt -s nullglob
    first=("$carry"/a/ort.part*)
    if ((${#first[@]} == 0)); then
        echo "gpu.sh --stash: no $carry/a/ort.part* here (carry .device/a in this call)" >&2
        exit 2
    fi
    mkdir -p "$parts" && cp "${first[@]}" "$parts"/ && ls -l "$parts" >&2
    echo "gpu.sh --stash: kept in $parts; next call: carry .device/b and .device/whl, run benchmarks/gpu.sh OUT" >&2
    exit 0
fi
out=$1
shift
device=${DEVICE:-cuda}
quick=${QUICK:-0}
budget=${BUDGET:-440}
start=$SECONDS
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
: > "$out/steps.jsonl"

if [[ -n ${PYTHON:-} ]]; then
    py=$PYTHON
elif [[ -x $root/.venv/bin/python ]]; then
    py=$root/.venv/bin/python
else
    py=python3
fi

# device_env: onnxruntime-gpu from make-carry.sh's parts (see the top), once per machine into $ORT_DIR
device_env() {
    local ort_dir=${ORT_DIR:-/tmp/ort} site=${SITE_DIR:-/tmp/site}
    shopt -s nullglob
    local first=("$carry"/a/ort.part*) second=("$carry"/b/ort.part*) wheels=("$carry"/whl/*.whl)
    ((${#first[@]})) || first=("$parts"/ort.part*)
    shopt -u nullglob
    if [[ ! -d $ort_dir/onnxruntime ]]; then
        if ((${#second[@]} == 0)); then
            echo "gpu.sh: no $carry/b/ort.part*: onnxruntime-gpu is not brought here (using $py's onnxruntime)" >&2
            return 0
        fi
        if ((${#first[@]} == 0)); then
            echo "gpu.sh: the first onnxruntime-gpu part is neither in $carry/a nor in $parts (run" \
                 "'benchmarks/gpu.sh --stash' in a call that carries .device/a)" >&2
            return 1
        fi
        echo "gpu.sh: unpacking onnxruntime-gpu from ${first[*]} ${second[*]} into $ort_dir" >&2
        rm -rf "$ort_dir.tmp" && mkdir -p "$ort_dir.tmp" \
            && cat "${first[@]}" "${second[@]}" | xz -dc | tar xf - -C "$ort_dir.tmp" \
            && mkdir -p "$ort_dir" && mv "$ort_dir.tmp/onnxruntime" "$ort_dir/" \
            || { echo "gpu.sh: unpacking onnxruntime-gpu failed" >&2; rm -rf "$ort_dir.tmp"; return 1; }
        rm -rf "$ort_dir.tmp"
        local image_ort
        image_ort=$("$py" -c "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))" 2>/dev/null)
        for d in transformers quantization tools; do
            [[ -n $image_ort && -e $image_ort/$d && ! -e $ort_dir/onnxruntime/$d ]] \
                && ln -sfn "$image_ort/$d" "$ort_dir/onnxruntime/$d"
        done
    fi
    if ((${#wheels[@]})) && [[ ! -d $site ]]; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" \
            || echo "gpu.sh: installing ${wheels[*]} failed" >&2
    fi
    local libs
    libs=$("$py" -c "
import glob, os, site
print(':'.join(sorted({os.path.dirname(f) for sp in site.getsitepackages()
                       for f in glob.glob(os.path.join(sp, 'nvidia', '**', 'lib*.so*'), recursive=True)})))" 2>/dev/null)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PYTHONPATH="$ort_dir:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
}
if [[ $device == cuda ]]; then
    device_env || echo "gpu.sh: continuing with $py's onnxruntime (the runtime's CUDA rows may be skipped)" >&2
fi

shim=
cleanup() { [[ -n $shim ]] && rm -rf "$shim"; return 0; }
trap cleanup EXIT
if ! (cd / && "$py" -c 'import vdeploy.bench, vdeploy.export, vdeploy.runtime' 2>/dev/null); then
    shim=$(mktemp -d)
    mkdir "$shim/vdeploy"
    for f in "$root"/vdeploy/*.py; do ln -s "$f" "$shim/vdeploy/"; done
    for d in "$root"/vdeploy/*/; do [[ ${d%/} == */__pycache__ ]] || ln -s "${d%/}" "$shim/vdeploy/"; done
    ln -s "$root/export" "$shim/vdeploy/export"
    ln -s "$root/runtime" "$shim/vdeploy/runtime"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu.sh: vdeploy is not installed in $py; using the checkout $root through $shim" >&2
fi
cd /tmp || exit 2  # python from outside the checkout: its bare vdeploy/ folder must not shadow the package

pin=  # set below while the compile warm-up holds the upper half of the cores: taskset for the foreground steps
# step NAME TIMEOUT CMD...: run CMD with its output in OUT/NAME.log, under TIMEOUT (capped by what is left of
# BUDGET), and record {"step", "rc", "seconds", "timeout_s"} in OUT/steps.jsonl. Never stops the script.
wanted() { [[ -z ${STEPS:-} || ,$STEPS, == *,$1,* ]]; }
step() {
    local name=$1 limit=$2
    shift 2
    if [[ $name != env ]] && ! wanted "$name"; then
        echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"timeout_s\": 0, \"skipped\": \"not in STEPS\"}" >> "$out/steps.jsonl"
        return 0
    fi
    local left=$((budget - (SECONDS - start)))
    if ((left < 15)); then
        echo "gpu.sh: [$name] skipped: the ${budget} s budget is spent" >&2
        echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"timeout_s\": 0, \"skipped\": \"budget spent\"}" >> "$out/steps.jsonl"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "gpu.sh: [$name] start (timeout ${limit} s, $((SECONDS - start)) s elapsed)" >&2
    local t0=$SECONDS
    timeout -k 10 "$limit" ${pin:+$pin} "$@" > "$out/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - t0))
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $took, \"timeout_s\": $limit}" >> "$out/steps.jsonl"
    if ((rc == 0)); then
        echo "gpu.sh: [$name] ok in ${took} s" >&2
    else
        echo "gpu.sh: [$name] FAILED rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)') in ${took} s; last lines of $out/$name.log:" >&2
        tail -n 8 "$out/$name.log" | sed 's/^/    /' >&2
    fi
    return 0
}

# ---- env: printed first, and kept in env.json / env.log
step env 60 "$py" - "$device" "$out/env.json" <<'EOF_PY'
import importlib, json, platform, shutil, subprocess, sys
device, path = sys.argv[1], sys.argv[2]
info = {"python": sys.version.split()[0], "platform": platform.platform(), "device": device}
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
for name in ("numpy", "torch", "onnx", "onnxruntime", "cupy", "array_api_compat", "array_api_strict", "tensorrt",
             "starlette", "uvicorn", "onnxslim", "vdeploy.runtime"):
    try:
        mod = importlib.import_module(name)
        info[name] = getattr(mod, "__version__", "imported")
    except Exception as e:  # noqa: BLE001
        info[name] = f"missing ({type(e).__name__}: {e})"[:160]
try:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["torch_cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
except Exception as e:  # noqa: BLE001
    info["torch_error"] = str(e)
try:
    import onnxruntime
    info["providers"] = onnxruntime.get_available_providers()
except Exception as e:  # noqa: BLE001
    info["providers"] = f"error: {e}"
for key, value in info.items():
    print(f"{key}: {value}")
json.dump(info, open(path, "w"), indent=1)
if device == "cuda" and not info.get("torch_cuda_available"):
    print("WARNING: torch sees no CUDA device", file=sys.stderr)
for name, why in (("cupy", "the device loop"), ("array_api_compat", "the device loop (make-carry.sh array-api-compat)")):
    if device == "cuda" and str(info.get(name, "")).startswith("missing"):
        print(f"WARNING: {name} does not import: {why} (the device step) will fail", file=sys.stderr)
if device == "cuda" and "CUDAExecutionProvider" not in info.get("providers", []):
    print("WARNING: onnxruntime has no CUDAExecutionProvider: the runtime's GPU rows will be skipped", file=sys.stderr)
EOF_PY
sed 's/^/gpu.sh: env: /' "$out/env.log"

if [[ $device == cuda ]]; then
    backend=cuda precisions=fp32,tf32,fp16 samplers=dpmpp:13,ddpm:100 config=base batches=1,4,8 repeats=10
    rows=torch,torch-fp16,torch-bf16,ort-cuda,ort-cuda-tf32,ort-cuda-fp16,ort-cuda-nograph,ort-cuda-nograph-fp16
    rows=$rows,ort-cuda-nhwc,ort-cuda-nhwc-tf32,ort-cuda-nhwc-fp16
    serve_args=(--quick)
    fp16_configs=base fp16_args=(--reuse "${WORK:-/tmp/vdeploy-gpu-work}/model" --no-bf16 --time-batches 1,4)
    compile_rows=torch,torch-fp16,torch-compile-fp16,ort-cuda,ort-cuda-fp16
else
    backend=cpu precisions=fp32,fp16 samplers=dpmpp:13,ddpm:100 config=small batches=1,4,8 repeats=10
    rows=torch,ort,ort-fp16
    serve_args=(--quick)
    fp16_configs=tiny fp16_args=(--time-batches 1)
    compile_rows=torch,torch-compile,ort
fi
compile_batches=1,4
rows=${ROWS:-$rows} batches=${BATCHES:-$batches}
work=${WORK:-/tmp/vdeploy-gpu-work}  # the base export, shared by latency, device and compile (kept out of OUT)
device_samplers=dpmpp:13,ddpm:100 fp16_steps=13
if [[ $quick == 1 ]]; then
    device_samplers=dpmpp:4,ddpm:3 fp16_steps=3
    samplers=dpmpp:4 config=tiny batches=${BATCHES:-1,2} repeats=2 compile_batches=1,2
    serve_args=(--quick --config tiny --concurrency 1,2 --modes on,off)
fi

# ---- the compile warm-up, in the background on the upper half of the cores (the compile step reuses its cache)
warm_pid=
if wanted compile; then
    cores=$(nproc) warm_pin=() warm_threads=1
    if ((cores >= 8)) && command -v taskset > /dev/null; then
        pin="taskset -c 0-$((cores / 2 - 1))"
        warm_pin=(taskset -c "$((cores / 2))-$((cores - 1))")
        warm_threads=$((cores / 2))
    fi
    echo "gpu.sh: [warm] torch.compile $compile_rows at batches $compile_batches in the background${pin:+ (foreground: $pin)}" >&2
    TORCHINDUCTOR_COMPILE_THREADS=$warm_threads "${warm_pin[@]}" "$py" - "$config" "$compile_rows" "$compile_batches" \
        > "$out/compile-warm.log" 2>&1 <<'EOF_PY' &
import sys, time
import torch
from vdeploy.bench import common, models, rows
spec, names, batches = sys.argv[1], set(sys.argv[2].split(",")), [int(b) for b in sys.argv[3].split(",")]
device = "cuda" if torch.cuda.is_available() else "cpu"
config = models.resolve_config(spec, None)[1]
unet = models.random_unet(config, 0).to(device)  # the weights, inputs and shapes latency.py --seed 0 uses
for row in rows.torch_rows(names, unet, config, common.Inputs(config, 0), device, len(batches)):
    if not row.name.startswith("torch-compile"):
        continue
    for b in batches:
        t0 = time.perf_counter()
        row.make(b)()
        print(f"{row.name} batch {b}: compile + first call {time.perf_counter() - t0:.1f} s", flush=True)
EOF_PY
    warm_pid=$!
else
    echo "gpu.sh: [warm] skipped (STEPS=$STEPS has no compile)" >&2
fi

step parity "${T_PARITY:-60}" "$py" "$root/benchmarks/gpu_parity.py" --out "$out/parity" --backend "$backend" \
    --precisions "$precisions" --samplers "$samplers"

step latency "${T_LATENCY:-160}" "$py" "$root/benchmarks/latency.py" --device "$device" --config "$config" \
    --batches "$batches" --repeats "$repeats" --warmup 3 --backends "$rows" \
    --skip "${LATENCY_SKIP:-flops,coldstart,profile,quality}" \
    --sampling-rounds 1 --dpmpp-steps 13 --work "$work" --json "$out/latency.json" --plot "$out/latency.png"

model=$work/model
[[ -f $model/vdeploy.json ]] || model=$out/parity/model  # the latency step's export failed: the tiny one
step device "${T_DEVICE:-50}" "$py" "$root/benchmarks/gpu_device.py" "$model" --backend "$backend" \
    --samplers "$device_samplers" --profile 12 --json "$out/device.json"

if ! wanted serve; then
    step serve 0 true
elif "$py" -c 'import starlette, uvicorn, prometheus_client' 2>/dev/null; then
    step serve "${T_SERVE:-80}" "$py" "$root/benchmarks/serve_load.py" --backend "$backend" "${serve_args[@]}" \
        --json "$out/serve.json" --md "$out/serve.md"
else
    echo "gpu.sh: [serve] skipped: starlette/uvicorn/prometheus_client do not import (the [serve] extra)" >&2
    echo '{"step": "serve", "rc": null, "seconds": 0, "timeout_s": 0, "skipped": "[serve] extra missing"}' >> "$out/steps.jsonl"
fi

# the warm-up: waited for at most W_WARM s (and never past the budget), then stopped; the compile step then
# compiles what it did not
if [[ -n $warm_pid ]]; then
    t0=$SECONDS
    while kill -0 "$warm_pid" 2>/dev/null && ((SECONDS - t0 < ${W_WARM:-60} && budget - (SECONDS - start) > 60)); do
        sleep 2
    done
    if kill -0 "$warm_pid" 2>/dev/null; then
        kill "$warm_pid" 2>/dev/null
        echo "gpu.sh: [warm] stopped after $((SECONDS - start)) s (not done)" >&2
    fi
    wait "$warm_pid" 2>/dev/null
    pin=
    sed 's/^/gpu.sh: [warm] /' "$out/compile-warm.log" | tail -n 6 >&2
fi

step compile "${T_COMPILE:-110}" "$py" "$root/benchmarks/latency.py" --device "$device" --config "$config" \
    --batches "$compile_batches" --compile-batches 2 --repeats 20 --warmup 2 --backends "$compile_rows" \
    --skip flops,sampling,coldstart,profile,quality --work "$work" --json "$out/compile.json"

step fp16 "${T_FP16:-110}" "$py" "$root/benchmarks/gpu_fp16_choice.py" --device "$backend" --configs "$fp16_configs" \
    --steps "$fp16_steps" --out "$out/fp16" "${fp16_args[@]}"

if [[ $device == cuda ]]; then  # the latency step's export, and the fp16 step's half-precision export beside it
    half=("$out"/fp16/*/float16)
    [[ -f ${half[0]}/vdeploy.json ]] || half=()
    step kernels "${T_KERNELS:-40}" "$py" "$root/benchmarks/gpu_kernels.py" "$model" "${half[@]}" \
        --precisions fp16,tf32 --batch 4 --json "$out/kernels.json"
fi

timeout -k 5 30 "$py" "$root/benchmarks/gpu_summary.py" "$out" > "$out/summary.log" 2>&1 \
    || echo "gpu.sh: [summary] FAILED: $(tail -n 3 "$out/summary.log")" >&2
cat "$out/summary.md" 2>/dev/null
echo "gpu.sh: done in $((SECONDS - start)) s; everything is in $out (summary.md, summary.json, steps.jsonl, *.log)" >&2
