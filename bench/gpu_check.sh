#!/usr/bin/env bash
# The MuseTalk GPU check in one go: the GPU-marked tests, then the end-to-end session benchmark,
# ending with a results block to paste into docs/performance.md. About 5-7 minutes on an H100/H200.
#
# It runs on a bare CUDA machine without network, where Python has PyTorch with CUDA (the device
# machines here: Python 3.12, torch, transformers, opencv, pytest). What it lacks travels in one
# ignored folder, .gpu-check/, made beforehand on a machine with network:
#
#   bench/gpu_check.sh fetch   # here: wheels the GPU image lacks (cp312, manylinux x86-64) and a drawn avatar
#   bench/gpu_check.sh run     # there, from the repository root (carry .gpu-check)
#   bench/gpu_check.sh cpu     # here: the same run on the CPU with tiny networks, a rehearsal of the script
#
# With the device tool: run(command="bench/gpu_check.sh run", carry=[".gpu-check"], timeout_s=540).
# Environment: PYTHON (default python3 there, .venv/bin/python here), SESSIONS (default 8,12,16,20,24),
# SECONDS_PER_RUN (default 10), MAX_BATCH (default 16), COMPILE (default off).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-run}
folder=.gpu-check
# Packages the GPU image does not have (see /work/.library/device/KINDS.md) and avatalk's renderer imports.
wheels=(diffusers pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
        ai-edge-litert backports.strenum typing-extensions)

fetch() {
    local python=${PYTHON:-.venv/bin/python}
    grep -qxF "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >>.git/info/exclude
    rm -rf "$folder/wheels" && mkdir -p "$folder/wheels"
    local name version specs=()
    for name in "${wheels[@]}"; do
        # The versions installed here, which the tests pass with.
        version=$("$python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        specs+=("$name${version:+==$version}")
    done
    "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
        -d "$folder/wheels" "${specs[@]}"
    rm -rf "$folder/avatars"
    "$python" -c "
from pathlib import Path
from avatalk.avatars.default_face import ensure_default_avatar
ensure_default_avatar(Path('$folder/avatars'), size=512, seconds=2.0)"
    du -sh "$folder"
}

run() {
    local python=${PYTHON:-python3} quick=()
    if [[ $mode == cpu ]]; then
        python=${PYTHON:-.venv/bin/python}
        quick=(--quick)
    fi
    export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if [[ -d $folder/wheels ]] && compgen -G "$folder/wheels/*.whl" >/dev/null && [[ $mode == run ]]; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$folder"/wheels/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    local avatars=()
    if [[ -d $folder/avatars/ava ]]; then
        export MUSETALK_AVATARS=$PWD/$folder/avatars
        avatars=(--avatars "$MUSETALK_AVATARS")
    fi
    "$python" - <<'EOF'
import platform, torch, transformers, diffusers
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name() if cuda else "no CUDA"
print(f"python {platform.python_version()}, torch {torch.__version__} ({name}), "
      f"transformers {transformers.__version__}, diffusers {diffusers.__version__}")
EOF
    if [[ $mode == run ]]; then
        "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use cpu mode')"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    fi
    echo "## GPU-marked tests"
    timeout 180 "$python" -m pytest -q --noconftest -p no:cacheprovider -m gpu tests/test_musetalk_gpu.py
    echo "## Sessions benchmark"
    timeout 360 "$python" bench/musetalk.py "${quick[@]}" "${avatars[@]}" \
        --sessions "${SESSIONS:-$([[ $mode == cpu ]] && echo 1,2 || echo 8,12,16,20,24)}" \
        --seconds "${SECONDS_PER_RUN:-$([[ $mode == cpu ]] && echo 6 || echo 10)}" \
        --max-batch "${MAX_BATCH:-$([[ $mode == cpu ]] && echo 4 || echo 16)}" --compile "${COMPILE:-off}"
}

case $mode in
    fetch) fetch ;;
    run | cpu) run ;;
    *) echo "usage: bench/gpu_check.sh fetch|run|cpu" >&2; exit 2 ;;
esac
