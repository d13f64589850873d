#!/usr/bin/env bash
# Install the project with its test extras into .venv and run the test suite (CPU only is fine).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# DeepSpeed compiles its ops on first use instead of at install time.
DS_BUILD_OPS=0 .venv/bin/pip install -q -e '.[test]'
.venv/bin/python -m pytest -q "$@"
