#!/usr/bin/env bash
# The demo from nothing: install the project with its demo extras into .venv, then generate a small video set,
# shard it, pretrain a small MAE-ST, finetune it (and a from-scratch baseline), evaluate and draw reconstructions.
# Uses the GPU(s) when there are any, DeepSpeed's CPU accelerator otherwise. Options go to the orchestrator:
#   bash scripts/demo.sh [--out_dir demo_out] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# DeepSpeed compiles its ops on first use instead of at install time.
DS_BUILD_OPS=0 .venv/bin/pip install -q -e '.[demo]'
.venv/bin/python -m mae_st.demo "$@"
