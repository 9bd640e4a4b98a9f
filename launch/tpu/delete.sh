#!/usr/bin/env bash
# Step 6: delete the queued resource and its TPU VMs. A slice is billed until this runs.
set -euo pipefail
SCRIPT_SYNOPSIS="launch/tpu/delete.sh --name=NAME --zone=ZONE [flags]"
SCRIPT_DESCRIPTION="Deletes the queued resource NAME together with its TPU VMs (--force). Anything written only
to the workers' disks is lost; outputs under gs:// stay."
ALLOWED_FLAGS="name zone project dry_run"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags "$@"
check_common_flags
tpu_delete
