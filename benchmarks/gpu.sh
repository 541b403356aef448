#!/usr/bin/env bash
# The latency benchmark with the GPU backends, in one call, on a machine with a CUDA GPU:
#
#     benchmarks/gpu.sh OUT_DIR [latency.py options...]
#     benchmarks/gpu.sh gpu-out --config base --repeats 30
#
# writes OUT_DIR/latency.json, latency.md (the markdown report), latency.png and latency.log, and the
# serving load benchmark's serve.json, serve.md and serve.log (benchmarks/serve_load.py, extra [serve]).
#
# Python: $PYTHON if set, else the checkout's .venv (README set-up with `pip install -e '.[gpu,train,export]'`),
# else python3 (e.g. a GPU image's python with torch and onnxruntime[-gpu]). Where vdeploy is not installed
# in that python, the checkout is put on its path through a folder of links (vdeploy, vdeploy.bench,
# vdeploy.export -> export/, vdeploy.runtime -> runtime/), so nothing is installed.
#
# What runs on the GPU: torch eager / torch.compile on CUDA (--device cuda); onnxruntime CUDA EP and the
# TensorRT EP where onnxruntime-gpu provides them; a native TensorRT plan where `tensorrt` and cuda-python
# import. Missing ones are listed as skipped in the report with the reason. The CPU backends run too.
# Options after OUT_DIR go to benchmarks/latency.py (default config: small). DEVICE=cpu runs the same
# command on the CPU, to check this script on a machine without a GPU.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
device=${DEVICE:-cuda}

if [[ -n ${PYTHON:-} ]]; then
    py=$PYTHON
elif [[ -x $root/.venv/bin/python ]]; then
    py=$root/.venv/bin/python
else
    py=python3
fi

shim=
cleanup() { [[ -n $shim ]] && rm -rf "$shim"; return 0; }
trap cleanup EXIT
if ! (cd / && "$py" -c 'import vdeploy.bench, vdeploy.export, vdeploy.runtime' 2>/dev/null); then
    shim=$(mktemp -d)
    mkdir "$shim/vdeploy"
    for f in "$root"/vdeploy/*.py; do ln -s "$f" "$shim/vdeploy/"; done
    ln -s "$root/vdeploy/bench" "$shim/vdeploy/bench"
    ln -s "$root/export" "$shim/vdeploy/export"
    ln -s "$root/runtime" "$shim/vdeploy/runtime"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu.sh: vdeploy is not installed in $py; using the checkout $root through $shim" >&2
fi

"$py" - "$device" <<'EOF'
import sys
device = sys.argv[1]
missing = []
for name in ("numpy", "torch", "onnx", "onnxruntime", "vdeploy.bench", "vdeploy.export", "vdeploy.runtime"):
    try:
        __import__(name)
    except ImportError as e:
        missing.append(f"{name} ({e})")
if missing:
    sys.exit("gpu.sh: cannot import " + ", ".join(missing))
import onnxruntime
import torch
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu.sh: torch sees no CUDA device (DEVICE=cpu runs the CPU benchmark instead)")
providers = onnxruntime.get_available_providers()
print(f"gpu.sh: torch {torch.__version__} (cuda {torch.version.cuda}), onnxruntime {onnxruntime.__version__} "
      f"providers {providers}", file=sys.stderr)
if device == "cuda" and "CUDAExecutionProvider" not in providers:
    print("gpu.sh: warning: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu, the "
          "vdeploy[gpu] extra): the runtime's GPU backends will be reported as skipped", file=sys.stderr)
EOF

mkdir -p "$out"
set -o pipefail
"$py" "$root/benchmarks/latency.py" --device "$device" --json "$out/latency.json" --plot "$out/latency.png" "$@" \
    2> >(tee "$out/latency.log" >&2) | tee "$out/latency.md"
echo "gpu.sh: wrote $out/latency.json, latency.md, latency.png, latency.log" >&2

# The serving load benchmark (vdeploy serve, step-level batching on vs off) on the same device, where the
# [serve] extra is installed; SERVE_BACKEND overrides the backend (e.g. tensorrt-ep).
if "$py" -c 'import starlette, uvicorn, prometheus_client' 2>/dev/null; then
    "$py" "$root/benchmarks/serve_load.py" --backend "${SERVE_BACKEND:-$device}" --json "$out/serve.json" \
        --md "$out/serve.md" 2> >(tee "$out/serve.log" >&2)
    echo "gpu.sh: wrote $out/serve.json, serve.md, serve.log" >&2
else
    echo "gpu.sh: serving load benchmark skipped: the [serve] extra is not installed (pip install 'vdeploy[serve]')" >&2
fi
