#!/usr/bin/env bash
# One prepared check of every CUDA path of i2e-train (the parts: benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh                    # .venv with the README's install lines, then the check
#   bash benchmarks/gpu_check.sh --python PY        # the environment of interpreter PY as it is, no install
#                                                   # (CI's .venv; a GPU machine without network whose python
#                                                   # has torch, the project's dependencies and pytest)
#   bash benchmarks/gpu_check.sh --cpu --python PY  # the reduced CPU form (what CI runs)
#
# Other options go to the driver: --quick, --only PARTS, --out DIR (default: $OUT, else gpu_check_out;
# relative to the repository root), --budget SECONDS. Output: <out>/gpu_check.md (the table),
# gpu_check.json, gpu_check.log; exit status 1 when any check FAILED, 2 when it could not start.
#
# CUDA extra: Triton, which SpikingJelly's fused LIF kernels on CUDA need ("spikingjelly[triton]"). The
# Linux torch wheels depend on it already, so this normally installs nothing. SpikingJelly's native CUDA
# extension (a source build with nvcc) is not built: without it SpikingJelly runs its Triton kernels.
set -euo pipefail
cd "$(dirname "$0")/.."

python=""
driver_args=()
while (($#)); do
    case "$1" in
        --python) python="${2:?--python needs an interpreter}"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) driver_args+=("$1"); shift ;;
    esac
done

if [[ -z "$python" ]]; then
    # the README's install lines, then the CUDA extra
    python3 -m venv .venv && .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 &&
        .venv/bin/pip install -e ".[dev]"
    .venv/bin/pip install "spikingjelly[triton]"
    python=.venv/bin/python
fi

"$python" -c "import torch, lightning, spikingjelly, hydra, datasets, pytest" || {
    echo "gpu_check.sh: $python lacks i2e-train's dependencies (see the import error above); install them" \
         "(README) or pass --python with an interpreter that has them" >&2
    exit 2
}
# The checkout's i2e_train and configs, also where the environment holds no install of the project.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$python" benchmarks/gpu_check.py "${driver_args[@]}"
