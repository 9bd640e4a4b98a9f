#!/usr/bin/env bash
# Step 1: request a TPU VM slice as a queued resource (spot or on-demand) and wait until it is ACTIVE.
set -euo pipefail
SCRIPT_SYNOPSIS="launch/tpu/create.sh --name=NAME --zone=ZONE --accelerator_type=TYPE [--spot] [flags]"
SCRIPT_DESCRIPTION="Requests the slice as a queued resource and waits until it is ACTIVE (a request can
wait in WAITING_FOR_RESOURCES for minutes or hours; billing starts at ACTIVE)."
ALLOWED_FLAGS="name zone project accelerator_type runtime_version spot poll_seconds fake_states dry_run"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags "$@"
check_common_flags
require_flags accelerator_type
FAKE_STATES=${FAKE_STATES:-WAITING_FOR_RESOURCES,ACTIVE}

tpu_create
wait_until_active
