#!/usr/bin/env bash
# Everything in one go: create the slice, install, copy data, train on every worker, stream the log
# until the trainer ends, delete the slice. For Spot slices use run_with_preemption.sh instead.
set -euo pipefail
SCRIPT_SYNOPSIS="launch/tpu/run.sh --name=NAME --zone=ZONE --accelerator_type=TYPE [--spot] [flags] -- --config configs/X.py --config.output_dir=gs://BUCKET/RUN [...]"
SCRIPT_DESCRIPTION="Runs create.sh, install.sh, data.sh (when --data_src or --mount_bucket is given), train.sh
and logs.sh, then delete.sh (unless --keep), and exits with the trainer's exit code. The slice is
deleted on failure too, after the log has been shown: an idle slice is billed by the hour.
A preempted Spot slice ends the run here; run_with_preemption.sh recreates it and resumes."
ALLOWED_FLAGS="name zone project accelerator_type runtime_version spot source_dir git_url git_ref pip_extra python workdir data_src data_dest mount_bucket mount_point env run_dir poll_seconds keep fake_states dry_run"
ACCEPTS_TRAIN_ARGS=1
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags "$@"
check_common_flags
require_flags accelerator_type
(( ${#TRAIN_ARGS[@]} )) || usage_error "give the train arguments after --, e.g. -- --config configs/exp.py"
FAKE_STATES=${FAKE_STATES:-WAITING_FOR_RESOURCES,ACTIVE}

finish() {  # finish EXIT_CODE: delete the slice unless --keep, and exit
  if (( KEEP )); then
    log "keeping $NAME (billed until deleted): launch/tpu/delete.sh --name=$NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT}"
  else
    tpu_delete || log "could not delete $NAME: delete it by hand, it is billed until then"
  fi
  exit "$1"
}

tpu_create
wait_until_active || finish 1
tpu_install || { log "install failed"; finish 1; }
if [[ -n $DATA_SRC || -n $MOUNT_BUCKET ]]; then
  tpu_copy_data || { log "data copy failed"; finish 1; }
fi
tpu_start_training || { log "could not start the trainer"; finish 1; }
trainer_exit_code=0
tpu_stream_logs || trainer_exit_code=$?
log "trainer exited with $trainer_exit_code"
finish "$trainer_exit_code"
