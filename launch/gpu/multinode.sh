#!/usr/bin/env bash
# Plain multi-node launch over ssh, no scheduler: one process per GPU host, each running the same
# `python -m bbu_jax.train` command as on one machine, joined by jax.distributed through the
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables that
# bbu_jax.parallel.distributed reads.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu/multinode.sh --hosts=h1,h2[,...] [--coordinator=h1:PORT] [--workdir=DIR] [--python=PY]
                               [--env=KEY=VALUE ...] [--ssh_option=OPT ...] [--dry_run]
                               -- --config configs/X.py [--config.FIELD=VALUE ...]

Starts the trainer on every host at once with `ssh HOST 'cd WORKDIR && env ... python -m bbu_jax.train ARGS'`,
prefixes each output line with its host, waits for all and exits non-zero if any failed. Process i runs
on the i-th host of --hosts; process 0 (the first host) writes logs and checkpoints. The project must be
installed at the same WORKDIR on every host (a shared file system or the same checkout), and every
host must reach the coordinator's port. If one process dies the others stop when jax.distributed
notices its missing heartbeat.

Flags:
  --hosts=LIST        comma-separated ssh destinations ([user@]host), one process each (required)
  --coordinator=H:P   address of the jax.distributed coordinator, on the first host
                      (default: first host's name, port 12355)
  --workdir=DIR       project directory on the hosts (default: this directory, $PWD)
  --python=PY         python interpreter on the hosts (default: python)
  --env=KEY=VALUE     extra environment for the trainer (repeatable)
  --ssh_option=OPT    extra ssh option (repeatable), e.g. --ssh_option=-p2222
  --dry_run           print the ssh commands, run nothing
  -h, --help          this message
Everything after -- goes to python -m bbu_jax.train unchanged.
USAGE
}

usage_error() {
  echo "multinode.sh: $*" >&2
  echo "Run with --help for the flags." >&2
  exit 2
}

quote_words() {  # words quoted only where needed, so printed commands paste back
  local out="" word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+="${out:+ }$word"
    else
      out+="${out:+ }'${word//\'/\'\\\'\'}'"
    fi
  done
  printf '%s' "$out"
}

hosts_flag="" coordinator="" workdir=$PWD python=python dry_run=0
extra_env=()
ssh_options=()
train_args=()
while (( $# )); do
  flag=$1
  value=""
  case "$flag" in
    -h|--help) usage; exit 0 ;;
    --dry_run) dry_run=1; shift; continue ;;
    --) shift; train_args=("$@"); break ;;
    --hosts=*|--coordinator=*|--workdir=*|--python=*|--env=*|--ssh_option=*)
      value=${flag#*=}
      flag=${flag%%=*}
      shift ;;
    --hosts|--coordinator|--workdir|--python|--env|--ssh_option)
      (( $# >= 2 )) || usage_error "$flag needs a value"
      value=$2
      shift 2 ;;
    *) usage_error "unknown argument '$flag'" ;;
  esac
  [[ -n $value ]] || usage_error "$flag needs a non-empty value"
  case "$flag" in
    --hosts) hosts_flag=$value ;;
    --coordinator) coordinator=$value ;;
    --workdir) workdir=$value ;;
    --python) python=$value ;;
    --env) extra_env+=("$value") ;;
    --ssh_option) ssh_options+=("$value") ;;
  esac
done

[[ -n $hosts_flag ]] || usage_error "--hosts is required"
IFS=, read -r -a hosts <<< "$hosts_flag"
for host in "${hosts[@]}"; do
  [[ $host =~ ^[A-Za-z0-9_.@:-]+$ ]] || usage_error "bad host '$host' in --hosts"
done
(( ${#train_args[@]} )) || usage_error "give the train arguments after --, e.g. -- --config configs/exp.py"
for item in "${extra_env[@]}"; do
  [[ $item =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env '$item' must be KEY=VALUE"
done
if [[ -z $coordinator ]]; then
  first_host=${hosts[0]#*@}
  coordinator="$first_host:12355"
fi
[[ $coordinator =~ ^[^:]+:[0-9]+$ ]] || usage_error "--coordinator '$coordinator' must be host:port"

num_processes=${#hosts[@]}
pids=()
for process_id in "${!hosts[@]}"; do
  host=${hosts[$process_id]}
  remote="cd $(quote_words "$workdir") && $(quote_words env PYTHONUNBUFFERED=1 \
    "JAX_COORDINATOR_ADDRESS=$coordinator" "JAX_NUM_PROCESSES=$num_processes" \
    "JAX_PROCESS_ID=$process_id" "${extra_env[@]}" "$python" -m bbu_jax.train "${train_args[@]}")"
  ssh_command=(ssh -o BatchMode=yes "${ssh_options[@]}" "$host" "$remote")
  if (( dry_run )); then
    quote_words "${ssh_command[@]}"
    echo
    continue
  fi
  # A subshell, so that `wait` returns ssh's status (pipefail) rather than sed's.
  ( "${ssh_command[@]}" 2>&1 | sed -u "s/^/[$process_id $host] /" ) &
  pids+=($!)
done
(( dry_run )) && exit 0

# Stop the ssh sessions this script started if it is interrupted.
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
failed=0
for index in "${!pids[@]}"; do
  if ! wait "${pids[$index]}"; then
    echo "multinode.sh: process $index on ${hosts[$index]} failed" >&2
    failed=1
  fi
done
exit "$failed"
