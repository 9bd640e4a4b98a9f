# shellcheck shell=bash
# shellcheck disable=SC2034  # globals set here are read by the scripts that source this file
# Shared by launch/tpu/*.sh: one flag parser, dry-run printing, and one function per gcloud step, so
# that each step script and the scripts that chain them issue exactly the same commands.
# Sourced, never run: the scripts set SCRIPT_SYNOPSIS, SCRIPT_DESCRIPTION and ALLOWED_FLAGS first.

LAUNCH_TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_TPU_DIR/../.." && pwd)

# ---- flags ---------------------------------------------------------------------------------------
# Every flag of every TPU script: kind (value | bool | list) and help. A script accepts the subset
# named in its ALLOWED_FLAGS; --flag=value and --flag value both work.
declare -A FLAG_KIND=(
  [name]=value [zone]=value [project]=value [dry_run]=bool
  [accelerator_type]=value [runtime_version]=value [spot]=bool
  [source_dir]=value [git_url]=value [git_ref]=value [pip_extra]=list [python]=value [workdir]=value
  [data_src]=value [data_dest]=value [mount_bucket]=value [mount_point]=value
  [env]=list [run_dir]=value [worker]=value
  [poll_seconds]=value [max_recreates]=value [keep]=bool [fake_states]=value
)
declare -A FLAG_HELP=(
  [name]="name of the queued resource and of its TPU VM slice (required)"
  [zone]="GCP zone, e.g. us-west4-a (v5e), us-east5-a (v5p), us-east5-b (v6e) (required)"
  [project]="GCP project (default: gcloud's configured project)"
  [dry_run]="print the exact commands, one per line on stdout, and run nothing"
  [accelerator_type]="TPU type: v5litepod-16, v5p-8, v6e-8, v4-8, ... (required)"
  [runtime_version]="TPU VM image (default from the accelerator: v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e, tpu-ubuntu2204-base)"
  [spot]="request Spot capacity: much cheaper, preemptible at any time (default: on-demand)"
  [source_dir]="local project tree copied to every worker (default: this repository)"
  [git_url]="clone this repository on every worker instead of copying source_dir"
  [git_ref]="branch, tag or commit to check out after --git_url (default: the default branch)"
  [pip_extra]="extra pip requirement installed on every worker (repeatable)"
  [python]="python interpreter on the workers (default: python3)"
  [workdir]="project directory on the workers, relative to the home directory (default: bbu_jax)"
  [data_src]="local folder (scp) or gs:// prefix (gcloud storage rsync) copied to every worker"
  [data_dest]="destination of --data_src on the workers, relative to home (default: data)"
  [mount_bucket]="gs://bucket[/folder] mounted read-only on every worker with gcsfuse"
  [mount_point]="where --mount_bucket is mounted, relative to home (default: gcs)"
  [env]="KEY=VALUE set for the trainer on every worker (repeatable), e.g. LIBTPU_INIT_ARGS=..."
  [run_dir]="trainer log, pid and exit code on the workers, relative to home (default: bbu_run)"
  [worker]="which worker's log to stream: 0, 1, ... or all (default: 0)"
  [poll_seconds]="seconds between two looks at the slice (default: 60)"
  [max_recreates]="give up after recreating a preempted slice this many times (default: 20)"
  [keep]="keep the slice at the end instead of deleting it (it is billed until deleted)"
  [fake_states]="with --dry_run: comma-separated queued-resource states returned by successive polls (ACTIVE:N = ACTIVE and the trainer exited with N), to rehearse the loop"
)

# Defaults. Names are the flags in upper case.
NAME="" ZONE="" PROJECT="" DRY_RUN=0
ACCELERATOR_TYPE="" RUNTIME_VERSION="" SPOT=0
SOURCE_DIR="$REPO_ROOT" GIT_URL="" GIT_REF="" PIP_EXTRA=() PYTHON=python3 WORKDIR=bbu_jax
DATA_SRC="" DATA_DEST=data MOUNT_BUCKET="" MOUNT_POINT=gcs
ENV=() RUN_DIR=bbu_run WORKER=0
POLL_SECONDS=60 MAX_RECREATES=20 KEEP=0 FAKE_STATES=""
TRAIN_ARGS=()

usage() {
  local flag
  echo "Usage: $SCRIPT_SYNOPSIS"
  echo
  echo "$SCRIPT_DESCRIPTION"
  echo
  echo "Flags:"
  for flag in $ALLOWED_FLAGS; do
    if [[ ${FLAG_KIND[$flag]} == bool ]]; then
      printf '  --%s\n' "$flag"
    else
      printf '  --%s=%s\n' "$flag" "${flag^^}"
    fi
    printf '      %s\n' "${FLAG_HELP[$flag]}"
  done
  echo "  -h, --help"
  echo "      this message"
}

usage_error() {
  echo "$(basename "$0"): $*" >&2
  echo "Run with --help for the flags." >&2
  exit 2
}

is_allowed() {
  [[ " $ALLOWED_FLAGS " == *" $1 "* ]]
}

# parse_flags "$@": sets the upper-case globals; everything after `--` becomes TRAIN_ARGS (only
# for scripts that take a train command, ACCEPTS_TRAIN_ARGS=1).
parse_flags() {
  local arg flag value
  while (( $# )); do
    arg=$1
    shift
    case "$arg" in
      -h|--help) usage; exit 0 ;;
      --)
        [[ ${ACCEPTS_TRAIN_ARGS:-0} == 1 ]] || usage_error "takes no train arguments after --"
        TRAIN_ARGS=("$@")
        return 0 ;;
      --*) ;;
      *) usage_error "unexpected argument '$arg'" ;;
    esac
    flag=${arg#--}
    value=""
    local has_value=0
    if [[ $flag == *=* ]]; then
      value=${flag#*=}
      flag=${flag%%=*}
      has_value=1
    fi
    is_allowed "$flag" || usage_error "unknown flag --$flag"
    case "${FLAG_KIND[$flag]}" in
      bool)
        (( has_value == 0 )) || usage_error "--$flag takes no value"
        printf -v "${flag^^}" '%s' 1 ;;
      value|list)
        if (( has_value == 0 )); then
          (( $# )) || usage_error "--$flag needs a value"
          value=$1
          shift
        fi
        [[ -n $value ]] || usage_error "--$flag needs a non-empty value"
        if [[ ${FLAG_KIND[$flag]} == list ]]; then
          local -n list_ref=${flag^^}
          list_ref+=("$value")
          unset -n list_ref
        else
          printf -v "${flag^^}" '%s' "$value"
        fi ;;
    esac
  done
}

require_flags() {
  local flag var
  for flag in "$@"; do
    var=${flag^^}
    [[ -n ${!var} ]] || usage_error "--$flag is required"
  done
}

# Paths on the workers are relative to the home directory and plain, so that they can be written
# into remote commands unquoted and `rm -rf` of the project directory can never hit home itself.
check_remote_path() {
  local flag=$1 path=$2
  [[ $path =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)*$ && $path != *..* ]] \
    || usage_error "--$flag '$path' must be a plain path relative to the home directory"
}

check_common_flags() {
  require_flags name zone
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || usage_error "--name '$NAME' must be lower-case letters, digits and dashes, starting with a letter"
  [[ $POLL_SECONDS =~ ^[0-9]+$ ]] || usage_error "--poll_seconds must be a whole number"
  [[ $MAX_RECREATES =~ ^[0-9]+$ ]] || usage_error "--max_recreates must be a whole number"
  [[ $WORKER =~ ^([0-9]+|all)$ ]] || usage_error "--worker must be a worker number or 'all'"
  check_remote_path workdir "$WORKDIR"
  check_remote_path run_dir "$RUN_DIR"
  check_remote_path data_dest "$DATA_DEST"
  check_remote_path mount_point "$MOUNT_POINT"
  local item
  for item in "${ENV[@]}"; do
    [[ $item =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env '$item' must be KEY=VALUE"
  done
  if [[ -n $FAKE_STATES ]] && (( ! DRY_RUN )); then
    usage_error "--fake_states only makes sense with --dry_run"
  fi
}

# ---- printing and running ------------------------------------------------------------------------
log() {
  printf '[%s %s] %s\n' "$(date -u +%H:%M:%S)" "$(basename "$0" .sh)" "$*" >&2
}

# One word, quoted only when it needs it, so that printed commands read naturally and paste back.
shell_quote() {
  local word=$1 prefix=""
  if [[ $word =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$word"
    return 0
  fi
  if [[ $word =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value' reads better than '--flag=value'
    prefix=${BASH_REMATCH[1]}
    word=${BASH_REMATCH[2]}
  fi
  printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
}

shell_join() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or with --dry_run prints it (stdout, one line, pasteable) and runs nothing.
run() {
  if (( DRY_RUN )); then
    shell_join "$@"
    echo
  else
    "$@"
  fi
}

gcloud_location() {
  printf '%s\n' "--zone=$ZONE"
  if [[ -n $PROJECT ]]; then
    printf '%s\n' "--project=$PROJECT"
  fi
}

# ---- the steps -----------------------------------------------------------------------------------
default_runtime_version() {
  case "$1" in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

tpu_create() {
  local runtime=$RUNTIME_VERSION location
  if [[ -z $runtime ]]; then
    runtime=$(default_runtime_version "$ACCELERATOR_TYPE") \
      || usage_error "no default runtime for --accelerator_type=$ACCELERATOR_TYPE; pass --runtime_version"
  fi
  mapfile -t location < <(gcloud_location)
  local tier=()
  if (( SPOT )); then
    tier=(--spot)
  fi
  log "requesting $ACCELERATOR_TYPE ($([[ ${#tier[@]} -gt 0 ]] && echo spot || echo on-demand)) as $NAME"
  run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${location[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$runtime" "${tier[@]}"
}

tpu_delete() {
  local location
  mapfile -t location < <(gcloud_location)
  log "deleting $NAME and its TPU VMs"
  # --force deletes the TPU VMs with the request; --quiet answers the confirmation prompt.
  run gcloud compute tpus queued-resources delete "$NAME" "${location[@]}" --force --quiet
}

# With --dry_run, successive polls take their answers from FAKE_STATES.
FAKE_INDEX=0
FAKE_TRAINING_STATUS=running

next_fake_state() {
  local states
  IFS=, read -r -a states <<< "$FAKE_STATES"
  if (( FAKE_INDEX >= ${#states[@]} )); then
    log "the --fake_states sequence ran out after $FAKE_INDEX polls"
    exit 3
  fi
  local token=${states[$FAKE_INDEX]}
  FAKE_INDEX=$((FAKE_INDEX + 1))
  STATE=${token%%:*}
  FAKE_TRAINING_STATUS=running
  if [[ $token == *:* ]]; then
    FAKE_TRAINING_STATUS=${token#*:}
  fi
}

# Sets STATE to the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...),
# NOT_FOUND when there is none, UNKNOWN when gcloud could not say (network, auth): never recreate
# on UNKNOWN.
query_state() {
  local location output
  mapfile -t location < <(gcloud_location)
  if (( DRY_RUN )); then
    run gcloud compute tpus queued-resources describe "$NAME" "${location[@]}" --format='value(state.state)'
    next_fake_state
    return 0
  fi
  local errors
  errors=$(mktemp)
  if output=$(gcloud compute tpus queued-resources describe "$NAME" "${location[@]}" \
      --format='value(state.state)' 2> "$errors"); then
    STATE=$(tail -n 1 <<< "$output")
    STATE=${STATE:-UNKNOWN}
  elif grep -qiE 'NOT_FOUND|not found' "$errors"; then
    STATE=NOT_FOUND
  else
    log "could not read the state of $NAME: $(cat "$errors")"
    STATE=UNKNOWN
  fi
  rm -f "$errors"
}

wait_until_active() {
  while true; do
    query_state
    case "$STATE" in
      ACTIVE) log "$NAME is ACTIVE"; return 0 ;;
      FAILED|SUSPENDING|SUSPENDED|NOT_FOUND)
        log "$NAME is $STATE: it will not become ACTIVE"
        return 1 ;;
      *) log "$NAME is $STATE; waiting" ;;
    esac
    (( DRY_RUN )) || sleep "$POLL_SECONDS"
  done
}

tpu_ssh() {  # tpu_ssh WORKER COMMAND
  local location
  mapfile -t location < <(gcloud_location)
  run gcloud compute tpus tpu-vm ssh "$NAME" "${location[@]}" --worker="$1" --command="$2"
}

tpu_scp_to_all() {  # tpu_scp_to_all LOCAL_PATH REMOTE_PATH
  local location
  mapfile -t location < <(gcloud_location)
  run gcloud compute tpus tpu-vm scp --recurse "$1" "$NAME:$2" "${location[@]}" --worker=all
}

pip_install_command() {
  shell_join "$PYTHON" -m pip install -q -e . 'jax[tpu]' "${PIP_EXTRA[@]}"
}

# Every step below checks each command itself: `set -e` does not act inside a function that a
# caller runs as a condition (the supervisor does).
tpu_install() {
  local pip_command
  pip_command=$(pip_install_command)
  if [[ -n $GIT_URL ]]; then
    log "cloning $GIT_URL on every worker and installing"
    local checkout=""
    if [[ -n $GIT_REF ]]; then
      checkout=" && git checkout $(shell_quote "$GIT_REF")"
    fi
    tpu_ssh all "rm -rf $WORKDIR && git clone -q $(shell_quote "$GIT_URL") $WORKDIR && cd $WORKDIR$checkout && $pip_command" \
      || return 1
    return 0
  fi
  [[ -d $SOURCE_DIR ]] || { log "--source_dir $SOURCE_DIR is not a directory"; return 1; }
  local archive="${TMPDIR:-/tmp}/bbu_jax-$NAME.tar.gz"
  log "copying $SOURCE_DIR to every worker and installing"
  run tar -czf "$archive" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=.venv -C "$SOURCE_DIR" . || return 1
  tpu_scp_to_all "$archive" "$WORKDIR.tar.gz" || return 1
  tpu_ssh all "rm -rf $WORKDIR && mkdir -p $WORKDIR && tar -xzf $WORKDIR.tar.gz -C $WORKDIR && cd $WORKDIR && $pip_command" \
    || return 1
}

tpu_copy_data() {
  if [[ -n $DATA_SRC ]]; then
    if [[ $DATA_SRC == gs://* ]]; then
      log "syncing $DATA_SRC to ~/$DATA_DEST on every worker"
      tpu_ssh all "mkdir -p $DATA_DEST && gcloud storage rsync --recursive $(shell_quote "$DATA_SRC") $DATA_DEST" \
        || return 1
    else
      [[ -e $DATA_SRC ]] || { log "--data_src $DATA_SRC does not exist"; return 1; }
      log "copying $DATA_SRC to ~/$DATA_DEST on every worker"
      tpu_scp_to_all "$DATA_SRC" "$DATA_DEST" || return 1
    fi
  fi
  if [[ -n $MOUNT_BUCKET ]]; then
    [[ $MOUNT_BUCKET =~ ^gs://([a-z0-9][-a-z0-9_.]*)(/(.*[^/]))?/?$ ]] \
      || { log "--mount_bucket '$MOUNT_BUCKET' is not gs://bucket[/folder]"; return 1; }
    local bucket=${BASH_REMATCH[1]} folder=${BASH_REMATCH[3]} only_dir=""
    if [[ -n $folder ]]; then
      only_dir=" --only-dir $(shell_quote "$folder")"
    fi
    log "mounting $MOUNT_BUCKET at ~/$MOUNT_POINT on every worker"
    # Single quotes on purpose: $(lsb_release ...) runs on the worker.
    # shellcheck disable=SC2016
    local install_gcsfuse='command -v gcsfuse >/dev/null || { curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; }'
    tpu_ssh all "$install_gcsfuse && mkdir -p $MOUNT_POINT && gcsfuse -o ro --implicit-dirs$only_dir $bucket $MOUNT_POINT" \
      || return 1
  fi
  return 0
}

# The command a user runs on one machine; the launchers run exactly this on every worker.
train_command() {
  shell_join "$PYTHON" -m bbu_jax.train "${TRAIN_ARGS[@]}"
}

# Starts the trainer on every worker at once, detached from the ssh session (a dropped connection
# must not stop a run), writing ~/RUN_DIR/train.log, train.pid and, when it ends, exit_code.
tpu_start_training() {
  (( ${#TRAIN_ARGS[@]} )) || { log "no train command: pass it after --"; return 1; }
  local run_dir="\$HOME/$RUN_DIR"
  local inner
  inner="$(train_command); echo \$? > $run_dir/exit_code"
  local environment
  environment=$(shell_join PYTHONUNBUFFERED=1 "${ENV[@]}")
  log "starting on every worker: $(train_command)"
  tpu_ssh all "mkdir -p $run_dir && if [ -f $run_dir/train.pid ] && kill -0 \$(cat $run_dir/train.pid) 2>/dev/null; then echo 'a trainer is already running' >&2; exit 1; fi; rm -f $run_dir/exit_code && cd $WORKDIR && { env $environment setsid nohup bash -c $(shell_quote "$inner") > $run_dir/train.log 2>&1 < /dev/null & echo \$! > $run_dir/train.pid; }" \
    || return 1
}

# Sets TRAINING_STATUS to "running", the trainer's exit code, or "lost" (no trainer and no exit
# code: the VM went away under it).
query_training_status() {
  local run_dir="\$HOME/$RUN_DIR"
  local command="cat $run_dir/exit_code 2>/dev/null || { kill -0 \$(cat $run_dir/train.pid 2>/dev/null) 2>/dev/null && echo running; } || echo lost"
  if (( DRY_RUN )); then
    tpu_ssh 0 "$command"
    TRAINING_STATUS=$FAKE_TRAINING_STATUS
    return 0
  fi
  local output
  if output=$(tpu_ssh 0 "$command" 2>/dev/null); then
    TRAINING_STATUS=$(tail -n 1 <<< "$output")
  else
    TRAINING_STATUS=lost
  fi
}

# Streams a worker's log until the trainer ends (GNU tail --pid), and exits with its exit code.
tpu_stream_logs() {
  local run_dir="\$HOME/$RUN_DIR"
  tpu_ssh "$WORKER" "until [ -f $run_dir/train.pid ]; do sleep 2; done; tail -n +1 -F --pid=\$(cat $run_dir/train.pid) $run_dir/train.log; code=\$(cat $run_dir/exit_code 2>/dev/null) || { echo 'the trainer ended without an exit code: it was killed' >&2; exit 1; }; exit \$code"
}

tpu_tail_log() {  # the last lines of worker 0's log (on stderr), for the record before a failed slice is deleted
  local command="tail -n 200 \$HOME/$RUN_DIR/train.log"
  if (( DRY_RUN )); then
    tpu_ssh 0 "$command"
  else
    tpu_ssh 0 "$command" >&2
  fi
}
