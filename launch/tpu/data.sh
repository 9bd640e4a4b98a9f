#!/usr/bin/env bash
# Step 3 (optional): copy data to every worker, or mount a bucket there. gs:// paths given to the
# trainer (data, checkpoints, output) need neither: the readers and orbax take them directly.
set -euo pipefail
SCRIPT_SYNOPSIS="launch/tpu/data.sh --name=NAME --zone=ZONE (--data_src=PATH_OR_GS [--data_dest=DIR] | --mount_bucket=gs://B[/F] [--mount_point=DIR]) [flags]"
SCRIPT_DESCRIPTION="Copies a local folder (scp) or a gs:// prefix (gcloud storage rsync, run on the workers) to
~/DATA_DEST on every worker, and/or mounts a bucket read-only at ~/MOUNT_POINT with gcsfuse."
ALLOWED_FLAGS="name zone project data_src data_dest mount_bucket mount_point dry_run"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags "$@"
check_common_flags
[[ -n $DATA_SRC || -n $MOUNT_BUCKET ]] || usage_error "give --data_src or --mount_bucket"
tpu_copy_data
