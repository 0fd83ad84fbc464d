#!/usr/bin/env bash
# The CUDA path on one real card, one summary line per check (PASS/FAIL/SKIP + figure).
#
#   bash benchmarks/gpu_check.sh             on a machine with a CUDA GPU (aim: under 8 minutes)
#   bash benchmarks/gpu_check.sh --dry-run   every step on the CPU backend with small simulated limits
#
# Extra arguments go to benchmarks/gpu_check.py (--limit 4GiB, --only probe: pinned: ...).
# Raw results: JSON lines in $OUT/gpu_check.jsonl when $OUT is set, else in a temporary folder.
# Offline machines: pydantic (and pytest) are installed from .whl/, shared/wheels/ or benchmarks/wheels/
# when missing. For the lent H200 machine (Python 3.12), on this machine, then carry .whl:
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic pytest
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

missing() { ! "$PY" -c "import $1" 2>/dev/null; }

for module in pydantic pytest; do
    if missing "$module"; then
        for folder in .whl shared/wheels benchmarks/wheels; do
            if [ -d "$folder" ]; then
                "$PY" -m pip install -q --no-index --find-links "$folder" "$module" && break
            fi
        done
    fi
done
if missing pydantic; then
    echo "FAIL setup: pydantic is not installed and no wheels were found in .whl/, shared/wheels/ or benchmarks/wheels/"
    echo "  (on a connected machine: pip download pydantic pytest -d shared/wheels)"
    exit 2
fi
if missing pytest; then
    echo "# note: pytest is missing: the gpu-tests check will fail (put its wheels in shared/wheels/)"
fi

# The package itself, without touching dependencies; PYTHONPATH covers a failed install.
if [ "${1:-}" != "--dry-run" ] && missing batchtune; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "# note: pip install -e . failed; using PYTHONPATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${OUT:-}" ]; then
    RESULTS="$OUT/gpu_check.jsonl"
else
    RESULTS="$(mktemp -d)/gpu_check.jsonl"
fi
exec "$PY" benchmarks/gpu_check.py --results "$RESULTS" "$@"
