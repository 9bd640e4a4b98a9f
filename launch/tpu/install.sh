#!/usr/bin/env bash
# Step 2: put the project on every worker of the slice (copy of this tree, or a git clone) and pip
# install it with jax[tpu].
set -euo pipefail
SCRIPT_SYNOPSIS="launch/tpu/install.sh --name=NAME --zone=ZONE [--git_url=URL [--git_ref=REF]] [flags]"
SCRIPT_DESCRIPTION="Copies --source_dir (default: this repository, without .git) to ~/WORKDIR on every worker,
or clones --git_url there, then runs pip install -e . 'jax[tpu]' on every worker at once."
ALLOWED_FLAGS="name zone project source_dir git_url git_ref pip_extra python workdir dry_run"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags "$@"
check_common_flags
tpu_install
