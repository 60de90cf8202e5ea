#!/usr/bin/env bash
# Build a private virtual environment for llm-compressor (vllm-project/llm-compressor),
# used only as a reference peer by eval/llmcompressor_sparsegpt.py.
#
# llm-compressor pins its own transformers / compressed-tensors versions, so it must
# never enter ctp's own environment (.venv): it lives in eval/.venv-llmcompressor
# (git-ignored). The script is idempotent: it creates the venv only if missing and
# re-running it just re-checks the pins.
#
# CPU only: torch is installed FIRST as the local CPU wheel (torch==2.13.0+cpu) and then
# held by a constraints file, so resolving llm-compressor's dependencies can never swap
# in a multi-GB CUDA build of torch from PyPI. If the +cpu wheel is not available, pip
# fails loudly instead of downloading CUDA torch.
#
# Usage:  bash eval/setup_llmcompressor_env.sh
# Env:    LLMC_VENV     (default: eval/.venv-llmcompressor next to this script)
#         LLMC_VERSION  (default: 0.14.0.1, the newest on PyPI when written; it
#                        accepts torch >=2.10,<=2.14.0 and transformers 5.15-5.17)
#         PYTHON        (default: python3; 3.10+ required)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${LLMC_VENV:-$here/.venv-llmcompressor}"
llmc_version="${LLMC_VERSION:-0.14.0.1}"
torch_pin="torch==2.13.0+cpu"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating venv $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)

# Constraints file kept inside the (ignored) venv folder: pins torch for every
# later pip call in this environment.
constraints="$venv/constraints.txt"
echo "$torch_pin" > "$constraints"

# 1) the CPU torch wheel, alone, first.
"${pip[@]}" install -c "$constraints" "$torch_pin"

# 2) llm-compressor and its pinned dependencies, with torch held by the constraint.
"${pip[@]}" install -c "$constraints" "llmcompressor==$llmc_version"

# 3) check: torch must still be the +cpu build, and nothing CUDA may have slipped in.
"${pip[@]}" list 2>/dev/null | grep -iE '^(torch|transformers|llmcompressor|compressed-tensors|datasets|accelerate) '
torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
case "$torch_version" in
    *+cpu) ;;
    *) echo "ERROR: torch in $venv is $torch_version, not a +cpu build" >&2; exit 1 ;;
esac
if "${pip[@]}" list 2>/dev/null | grep -qiE '^nvidia-(cu|cuda|cudnn|nccl)'; then
    echo "ERROR: CUDA runtime packages were installed into $venv" >&2
    exit 1
fi
"$venv/bin/python" -c 'import llmcompressor, transformers; print("llmcompressor", llmcompressor.__version__, "transformers", transformers.__version__)'
echo "ok: $venv"
