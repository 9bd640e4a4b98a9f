#!/usr/bin/env bash
# Supervisor for Spot slices: keeps a training run going until it finishes, recreating the slice
# each time it is preempted and rerunning the same train command, which resumes from the last
# checkpoint in --config.output_dir (use gs://: the workers' disks go with the slice).
set -euo pipefail
SCRIPT_SYNOPSIS="launch/tpu/run_with_preemption.sh --name=NAME --zone=ZONE --accelerator_type=TYPE --spot [flags] -- --config configs/X.py --config.output_dir=gs://BUCKET/RUN [...]"
SCRIPT_DESCRIPTION="Polls the queued resource every --poll_seconds:
  none yet                      -> create it
  WAITING_FOR_RESOURCES, ...    -> wait
  ACTIVE, trainer not started   -> install, copy data, start the trainer on every worker
  ACTIVE, trainer running       -> wait
  ACTIVE, trainer exited 0      -> done: delete the slice (unless --keep), exit 0
  ACTIVE, trainer failed        -> show its log, delete the slice (unless --keep), exit 1
  SUSPENDED/SUSPENDING/FAILED   -> preempted: delete and recreate it, then start again
A trainer that dies while its slice goes down counts as preempted, not failed.
With --dry_run it prints every command of the loop; --fake_states feeds the polls, e.g.
  --fake_states=NOT_FOUND,WAITING_FOR_RESOURCES,ACTIVE,ACTIVE,SUSPENDED,ACTIVE,ACTIVE:0
(default NOT_FOUND,ACTIVE,ACTIVE:0)."
ALLOWED_FLAGS="name zone project accelerator_type runtime_version spot source_dir git_url git_ref pip_extra python workdir data_src data_dest mount_bucket mount_point env run_dir poll_seconds max_recreates keep fake_states dry_run"
ACCEPTS_TRAIN_ARGS=1
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags "$@"
check_common_flags
require_flags accelerator_type
(( ${#TRAIN_ARGS[@]} )) || usage_error "give the train arguments after --, e.g. -- --config configs/exp.py"
(( SPOT )) || log "note: --spot not given; an on-demand slice is not preempted, but this loop still recovers it"
FAKE_STATES=${FAKE_STATES:-NOT_FOUND,ACTIVE,ACTIVE:0}

launched=0          # the trainer was started on the current slice
recreates=0
failed_launches=0   # consecutive: a broken install must not loop forever

pause() {
  (( DRY_RUN )) || sleep "$POLL_SECONDS"
}

end_run() {  # end_run EXIT_CODE
  if (( KEEP )); then
    log "keeping $NAME (billed until deleted): launch/tpu/delete.sh --name=$NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT}"
  else
    tpu_delete || log "could not delete $NAME: delete it by hand, it is billed until then"
  fi
  exit "$1"
}

recreate() {
  recreates=$((recreates + 1))
  if (( recreates > MAX_RECREATES )); then
    log "$NAME went down $recreates times; giving up (--max_recreates=$MAX_RECREATES)"
    end_run 1
  fi
  log "$NAME is $STATE: recreating it (recreation $recreates of at most $MAX_RECREATES)"
  tpu_delete || log "delete failed; trying to create anyway"
  tpu_create || log "create failed; will retry"
  launched=0
  failed_launches=0  # a launch cut short by the preemption says nothing about the next slice
}

launch() {
  if tpu_install && { [[ -z $DATA_SRC && -z $MOUNT_BUCKET ]] || tpu_copy_data; } && tpu_start_training; then
    launched=1
    failed_launches=0
    log "trainer started on $NAME"
    return 0
  fi
  failed_launches=$((failed_launches + 1))
  log "launch failed ($failed_launches in a row)"
  if (( failed_launches >= 3 )); then
    log "giving up: the launch fails on a healthy slice"
    end_run 1
  fi
}

while true; do
  query_state
  case "$STATE" in
    NOT_FOUND)
      log "$NAME does not exist: creating it"
      tpu_create || log "create failed; will retry"
      launched=0 ;;
    ACTIVE)
      if (( ! launched )); then
        launch
      else
        query_training_status
        case "$TRAINING_STATUS" in
          running) ;;
          0)
            log "training finished"
            end_run 0 ;;
          *)
            # The trainer also dies when the slice is preempted under it: look again after a while
            # and call it a failure only if the slice is still ACTIVE.
            log "trainer ended with '$TRAINING_STATUS'; checking whether $NAME is going down"
            pause
            query_state
            if [[ $STATE == ACTIVE ]]; then
              log "training failed on a healthy slice (exit '$TRAINING_STATUS'); last lines of worker 0's log:"
              tpu_tail_log || true
              end_run 1
            fi
            recreate ;;
        esac
      fi ;;
    SUSPENDING|SUSPENDED|FAILED|PREEMPTED)
      recreate ;;
    *)
      log "$NAME is $STATE; waiting" ;;
  esac
  pause
done
