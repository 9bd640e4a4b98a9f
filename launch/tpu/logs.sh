#!/usr/bin/env bash
# Step 5: stream a worker's training log until the trainer ends; exits with the trainer's exit code.
set -euo pipefail
SCRIPT_SYNOPSIS="launch/tpu/logs.sh --name=NAME --zone=ZONE [--worker=0|all] [flags]"
SCRIPT_DESCRIPTION="Follows ~/RUN_DIR/train.log on the worker (process 0 writes the metrics) until exit_code
appears, then exits with that code. Interrupting it does not stop the training."
ALLOWED_FLAGS="name zone project worker run_dir dry_run"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags "$@"
check_common_flags
tpu_stream_logs
