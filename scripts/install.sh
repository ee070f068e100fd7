#!/usr/bin/env bash
# Install raylead into ./.venv.  Usage: bash scripts/install.sh [test]
#   CPU machines get the CPU build of torch (torch==2.13.0; set RAYLEAD_TORCH to change it). That
#   pin resolves to a CPU wheel on indexes that serve one under it (as here); where pip's index is
#   plain PyPI, whose Linux torch is the CUDA build, set RAYLEAD_TORCH_INDEX to PyTorch's CPU index
#   (https://download.pytorch.org/whl/cpu) and torch comes from there.
#   Machines with an NVIDIA GPU keep pip's CUDA torch and get faiss-gpu + onnxruntime-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip  # old resolvers backtrack for minutes over this dependency set
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $pip install -q -c constraints.txt -e ".${extras:+[$extras]}"
  $pip uninstall -q -y faiss-cpu onnxruntime
  $pip install -q "faiss-gpu-cu12>=1.8" "onnxruntime-gpu>=1.17"
else
  $pip install -q ${RAYLEAD_TORCH_INDEX:+--index-url "$RAYLEAD_TORCH_INDEX"} "${RAYLEAD_TORCH:-torch==2.13.0}"
  # constraints.txt pins the tested versions: a fast, reproducible resolve
  $pip install -q -c constraints.txt -e ".${extras:+[$extras]}"
fi
if [ "$extras" = "test" ] && [ ! -x /usr/bin/chromium ]; then
  # the report tests open reports in Debian's headless chromium (tests/browser.py)
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 \
    && $sudo apt-get update -qq >/dev/null \
    && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; then
    echo "installed chromium for the report tests"
  else
    echo "warning: could not install chromium (apt-get unavailable or no root); the browser tests of" \
      "tests/test_report.py will be skipped: install Debian's chromium at /usr/bin/chromium" >&2
  fi
fi
echo "raylead installed in $(pwd)/.venv"
