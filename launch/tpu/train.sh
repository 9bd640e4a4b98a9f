#!/usr/bin/env bash
# Step 4: start the same `python -m bbu_jax.train ...` command as on one machine on every worker at
# once; jax.distributed finds the other workers by itself on a TPU VM.
set -euo pipefail
SCRIPT_SYNOPSIS="launch/tpu/train.sh --name=NAME --zone=ZONE [--env=KEY=VALUE ...] [flags] -- --config configs/X.py [--config.FIELD=VALUE ...]"
SCRIPT_DESCRIPTION="Everything after -- is passed to python -m bbu_jax.train unchanged. The trainer runs detached
(a dropped ssh connection does not stop it) and writes ~/RUN_DIR/train.log, train.pid and, when it
ends, exit_code on each worker. Use gs:// for --config.output_dir so that checkpoints outlive the slice."
ALLOWED_FLAGS="name zone project env python workdir run_dir dry_run"
ACCEPTS_TRAIN_ARGS=1
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags "$@"
check_common_flags
(( ${#TRAIN_ARGS[@]} )) || usage_error "give the train arguments after --, e.g. -- --config configs/exp.py"
tpu_start_training
