"""Launch scripts (launch/tpu, launch/gpu) and the multi-host start-up of bbu_jax.parallel.distributed.

The scripts are checked through --dry_run (the exact commands they print, parsed back with shlex),
by running the remote shell commands they build on this machine, by feeding the printed gcloud
commands to the real gcloud (when installed) to prove that gcloud accepts every flag, and by
shellcheck. distributed.py is tested on its parsing rules and with two real processes on loopback.
"""

import json
import os
import pathlib
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu"
GPU = REPO / "launch" / "gpu"
TPU_SCRIPTS = ["create.sh", "install.sh", "data.sh", "train.sh", "logs.sh", "delete.sh", "run.sh",
               "run_with_preemption.sh"]
ALL_SCRIPTS = sorted(path for path in [*TPU.glob("*.sh"), *GPU.glob("*.sh"), *GPU.glob("*.sbatch")]
                     if path.name != "lib.sh")
SHELL_FILES = [*ALL_SCRIPTS, TPU / "lib.sh"]  # lib.sh is sourced by the TPU scripts, never run

BASE = ["--name=bbu-run1", "--zone=us-west4-a", "--project=my-proj"]
TRAIN_ARGS = ["--config", "configs/exp.py", "--config.output_dir=gs://bucket/runs/run1",
              "--config.model_path=gs://bucket/Qwen2.5-VL-3B"]
ONE_MACHINE_COMMAND = ["python3", "-m", "bbu_jax.train", *TRAIN_ARGS]


def run_script(script, *args, env=None, check_rc=None):
  environ = {**os.environ, **(env or {})}
  result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=environ,
                          timeout=60, cwd=REPO)
  if check_rc is not None:
    assert result.returncode == check_rc, (result.returncode, result.stdout, result.stderr)
  return result


def commands(stdout: str) -> list[list[str]]:
  """The printed commands, one per line, parsed back as a shell would."""
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def dry_run(script, *args, check_rc=0):
  result = run_script(TPU / script, *BASE, "--dry_run", *args, check_rc=check_rc)
  return commands(result.stdout), result


def flag(command, name):
  """The value of --name=value in a parsed command, or None."""
  prefix = f"--{name}="
  values = [word[len(prefix):] for word in command if word.startswith(prefix)]
  assert len(values) <= 1, command
  return values[0] if values else None


def kind(command):
  """"create", "describe", "delete", "ssh", "scp", or the program name."""
  if command[:3] == ["gcloud", "compute", "tpus"]:
    return command[4]
  return command[0]


def remote_command(command):
  assert kind(command) == "ssh", command
  return flag(command, "command")


def is_train_start(command):
  return kind(command) == "ssh" and "bbu_jax.train" in remote_command(command)


def started_train_command(command) -> list[str]:
  """The trainer's argv inside a train-start ssh command (the `bash -c '...'` it runs detached)."""
  words = shlex.split(remote_command(command))
  inner = words[words.index("-c") + 1]
  return shlex.split(inner.split(";")[0])


# ---- shellcheck ----------------------------------------------------------------------------------

def test_every_script_is_present():
  names = {path.name for path in ALL_SCRIPTS}
  assert set(TPU_SCRIPTS) <= names
  assert {"slurm.sbatch", "multinode.sh"} <= names


@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda path: path.name)
def test_shellcheck_passes(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
  result = subprocess.run(["shellcheck", "-x", script.name], cwd=script.parent, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda path: path.name)
def test_scripts_are_strict_and_executable(script):
  text = script.read_text()
  assert "set -euo pipefail" in text
  assert text.startswith("#!/usr/bin/env bash")
  assert script.stat().st_mode & stat.S_IXUSR


# ---- usage and bad arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("script", TPU_SCRIPTS)
def test_tpu_help_lists_the_flags(script):
  result = run_script(TPU / script, "--help", check_rc=0)
  assert result.stdout.startswith("Usage: launch/tpu/" + script)
  for name in ("--name=NAME", "--zone=ZONE", "--dry_run"):
    assert name in result.stdout


@pytest.mark.parametrize("script", TPU_SCRIPTS)
def test_tpu_unknown_flag_fails_with_usage_hint(script):
  result = run_script(TPU / script, *BASE, "--dry_run", "--no_such_flag=1", check_rc=2)
  assert "unknown flag --no_such_flag" in result.stderr
  assert "--help" in result.stderr
  assert result.stdout == ""


@pytest.mark.parametrize("script", TPU_SCRIPTS)
def test_tpu_missing_name_fails(script):
  result = run_script(TPU / script, "--zone=us-west4-a", "--dry_run", check_rc=2)
  assert "--name is required" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--accelerator_type"], "--accelerator_type needs a value"),
    (["--accelerator_type=v5p-8", "--spot=yes"], "--spot takes no value"),
    (["--accelerator_type=v5p-8", "stray"], "unexpected argument 'stray'"),
    (["--accelerator_type=v9x-8"], "no default runtime"),
    (["--accelerator_type=v5p-8", "--fake_states=ACTIVE", "--", "x"], "takes no train arguments"),
])
def test_create_rejects_bad_arguments(args, message):
  result = run_script(TPU / "create.sh", *BASE, "--dry_run", *args)
  assert result.returncode == 2, result.stderr
  assert message in result.stderr


def test_bad_values_are_rejected():
  assert "must be lower-case" in run_script(TPU / "delete.sh", "--name=Bad_Name", "--zone=z",
                                            "--dry_run", check_rc=2).stderr
  assert "plain path relative to the home" in run_script(
      TPU / "train.sh", *BASE, "--dry_run", "--workdir=../etc", "--", "--config", "c.py", check_rc=2).stderr
  assert "must be KEY=VALUE" in run_script(
      TPU / "train.sh", *BASE, "--dry_run", "--env=NOEQUALS", "--", "--config", "c.py", check_rc=2).stderr
  assert "give the train arguments after --" in run_script(
      TPU / "train.sh", *BASE, "--dry_run", check_rc=2).stderr
  assert "only makes sense with --dry_run" in run_script(
      TPU / "create.sh", *BASE, "--accelerator_type=v5p-8", "--fake_states=ACTIVE", check_rc=2).stderr


# ---- single steps --------------------------------------------------------------------------------

@pytest.mark.parametrize("accelerator, runtime", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
    ("v4-8", "tpu-ubuntu2204-base"),
])
def test_create_queued_resource_spot(accelerator, runtime):
  printed, _ = dry_run("create.sh", f"--accelerator_type={accelerator}", "--spot")
  create = printed[0]
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "bbu-run1"]
  assert flag(create, "node-id") == "bbu-run1"
  assert flag(create, "zone") == "us-west4-a"
  assert flag(create, "project") == "my-proj"
  assert flag(create, "accelerator-type") == accelerator
  assert flag(create, "runtime-version") == runtime
  assert "--spot" in create
  # then it polls the request until ACTIVE (the default rehearsal: WAITING_FOR_RESOURCES, ACTIVE)
  assert [kind(command) for command in printed[1:]] == ["describe", "describe"]
  assert flag(printed[1], "format") == "value(state.state)"


def test_create_on_demand_has_no_tier_flag_and_runtime_can_be_forced():
  printed, _ = dry_run("create.sh", "--accelerator_type=v5litepod-16", "--runtime_version=my-image",
                       "--fake_states=ACTIVE")
  assert "--spot" not in printed[0]
  assert flag(printed[0], "runtime-version") == "my-image"
  assert len(printed) == 2


def test_create_fails_when_the_request_fails():
  printed, result = dry_run("create.sh", "--accelerator_type=v5p-8", "--fake_states=WAITING_FOR_RESOURCES,FAILED",
                            check_rc=1)
  assert "will not become ACTIVE" in result.stderr
  assert [kind(command) for command in printed] == ["create", "describe", "describe"]


def test_delete_forces_and_does_not_prompt():
  printed, _ = dry_run("delete.sh")
  assert printed == [["gcloud", "compute", "tpus", "queued-resources", "delete", "bbu-run1",
                      "--zone=us-west4-a", "--project=my-proj", "--force", "--quiet"]]


def test_install_copies_this_tree_to_every_worker(tmp_path):
  printed, _ = dry_run("install.sh", "--pip_extra=tensorboard")
  tar, scp, ssh = printed
  assert tar[0] == "tar" and tar[tar.index("-C") + 1] == str(REPO)
  archive = tar[tar.index("-czf") + 1]
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert scp[6:8] == [archive, "bbu-run1:bbu_jax.tar.gz"]
  assert flag(scp, "worker") == "all" and flag(ssh, "worker") == "all"
  assert "tar -xzf bbu_jax.tar.gz -C bbu_jax" in remote_command(ssh)
  assert "python3 -m pip install -q -e . 'jax[tpu]' tensorboard" in remote_command(ssh)

  # The printed archive command, run here on a small tree, leaves .git and caches out.
  source = tmp_path / "src"
  (source / ".git").mkdir(parents=True)
  (source / ".git" / "HEAD").write_text("ref")
  (source / "pkg" / "__pycache__").mkdir(parents=True)
  (source / "pkg" / "__pycache__" / "m.pyc").write_bytes(b"0")
  (source / "pkg" / "m.py").write_text("x = 1\n")
  printed, _ = dry_run("install.sh", f"--source_dir={source}")
  tar = printed[0]
  tar[tar.index("-czf") + 1] = str(tmp_path / "a.tar.gz")
  subprocess.run(tar, check=True)
  with tarfile.open(tmp_path / "a.tar.gz") as archive_file:
    names = {name.lstrip("./") for name in archive_file.getnames()}
  assert "pkg/m.py" in names
  assert not any(".git" in name or "__pycache__" in name for name in names)


def test_install_from_git():
  printed, _ = dry_run("install.sh", "--git_url=https://example.com/bbu_jax.git", "--git_ref=v1.2")
  assert len(printed) == 1
  command = remote_command(printed[0])
  assert flag(printed[0], "worker") == "all"
  assert "git clone -q https://example.com/bbu_jax.git bbu_jax && cd bbu_jax && git checkout v1.2" in command


def test_data_from_gcs_local_and_mounted(tmp_path):
  printed, _ = dry_run("data.sh", "--data_src=gs://bucket/bbu/train")
  assert flag(printed[0], "worker") == "all"
  assert remote_command(printed[0]) == "mkdir -p data && gcloud storage rsync --recursive gs://bucket/bbu/train data"

  (tmp_path / "images").mkdir()
  printed, _ = dry_run("data.sh", f"--data_src={tmp_path / 'images'}", "--data_dest=datasets/bbu")
  assert kind(printed[0]) == "scp" and flag(printed[0], "worker") == "all"
  assert printed[0][6:8] == [str(tmp_path / "images"), "bbu-run1:datasets/bbu"]

  printed, _ = dry_run("data.sh", "--mount_bucket=gs://bucket/bbu/images")
  assert remote_command(printed[0]).endswith(
      "mkdir -p gcs && gcsfuse -o ro --implicit-dirs --only-dir bbu/images bucket gcs")
  assert "apt-get install -y -qq gcsfuse" in remote_command(printed[0])

  assert "give --data_src or --mount_bucket" in run_script(TPU / "data.sh", *BASE, "--dry_run",
                                                            check_rc=2).stderr


def test_train_runs_the_one_machine_command_on_every_worker():
  printed, _ = dry_run("train.sh", "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true",
                       "--", *TRAIN_ARGS)
  assert len(printed) == 1
  assert flag(printed[0], "worker") == "all"
  assert started_train_command(printed[0]) == ONE_MACHINE_COMMAND
  remote = shlex.split(remote_command(printed[0]))
  env_words = remote[remote.index("env") + 1:remote.index("setsid")]
  assert env_words == ["PYTHONUNBUFFERED=1", "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true"]


def test_logs_follow_the_chosen_worker():
  printed, _ = dry_run("logs.sh", "--worker=all")
  assert flag(printed[0], "worker") == "all"
  assert "tail -n +1 -F --pid=$(cat $HOME/bbu_run/train.pid) $HOME/bbu_run/train.log" in remote_command(printed[0])
  printed, _ = dry_run("logs.sh")
  assert flag(printed[0], "worker") == "0"


# ---- the remote commands, run here ---------------------------------------------------------------

def fake_python(path: pathlib.Path, exit_code: int, sleep_s: float = 0.0) -> pathlib.Path:
  """A stand-in interpreter that records its argv and environment, like the trainer would see them."""
  path.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys, time
      print("step 1 loss 2.5", flush=True)
      with open(os.path.expanduser("~/argv.json"), "w") as f:
        json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                   "env": {{k: v for k, v in os.environ.items() if k in ("PYTHONUNBUFFERED", "MY_FLAG")}}}}, f)
      time.sleep({sleep_s})
      print("done", flush=True)
      sys.exit({exit_code})
      """))
  path.chmod(0o755)
  return path


def wait_for(path: pathlib.Path, timeout_s: float = 20.0):
  deadline = time.time() + timeout_s
  while not path.exists():
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.1)


def run_remote(command: str, home: pathlib.Path, timeout_s: float = 60):
  return subprocess.run(["bash", "-c", command], cwd=home, env={**os.environ, "HOME": str(home)},
                        capture_output=True, text=True, timeout=timeout_s)


def test_remote_train_status_and_log_commands_work_in_a_shell(tmp_path):
  """The strings sent to the workers, run by bash here: quoting survives, the trainer runs detached
  with the right argv, the exit code lands where the supervisor and logs.sh look."""
  home = tmp_path / "home"
  (home / "bbu_jax").mkdir(parents=True)
  python = fake_python(tmp_path / "python", exit_code=7)
  odd_args = ["--config", "configs/it's here.py", "--config.note=a;b $HOME `x`"]
  printed, _ = dry_run("train.sh", f"--python={python}", "--env=MY_FLAG=x y", "--", *odd_args)
  start = run_remote(remote_command(printed[0]), home)
  assert start.returncode == 0, start.stderr
  wait_for(home / "bbu_run" / "exit_code")
  recorded = json.loads((home / "argv.json").read_text())
  assert recorded["argv"] == ["-m", "bbu_jax.train", *odd_args]
  assert recorded["cwd"] == str(home / "bbu_jax")
  assert recorded["env"] == {"PYTHONUNBUFFERED": "1", "MY_FLAG": "x y"}
  assert (home / "bbu_run" / "exit_code").read_text().strip() == "7"

  status_command = remote_command(dry_run("run_with_preemption.sh", "--accelerator_type=v5p-8",
                                          "--fake_states=ACTIVE,ACTIVE:0", "--", "--config", "c.py")[0][-2])
  status = run_remote(status_command, home)
  assert status.stdout.strip() == "7"

  logs = run_remote(remote_command(dry_run("logs.sh")[0][0]), home)
  assert logs.returncode == 7
  assert "step 1 loss 2.5" in logs.stdout and "done" in logs.stdout


def test_remote_start_refuses_a_second_trainer_and_status_says_running(tmp_path):
  home = tmp_path / "home"
  (home / "bbu_jax").mkdir(parents=True)
  python = fake_python(tmp_path / "python", exit_code=0, sleep_s=30)
  printed, _ = dry_run("train.sh", f"--python={python}", "--", "--config", "c.py")
  start = remote_command(printed[0])
  assert run_remote(start, home).returncode == 0
  wait_for(home / "argv.json")
  status_command = remote_command(dry_run("run_with_preemption.sh", "--accelerator_type=v5p-8",
                                          "--fake_states=ACTIVE,ACTIVE:0", "--", "--config", "c.py")[0][-2])
  try:
    assert run_remote(status_command, home).stdout.strip() == "running"
    second = run_remote(start, home)
    assert second.returncode == 1
    assert "already running" in second.stderr
  finally:
    os.killpg(int((home / "bbu_run" / "train.pid").read_text()), 15)  # its own session: all of it
  deadline = time.time() + 20
  while run_remote(status_command, home).stdout.strip() == "running":
    assert time.time() < deadline
    time.sleep(0.2)
  # killed with the VM: no exit code written by the trainer's shell, or the signal's code
  assert run_remote(status_command, home).stdout.strip() in ("lost", "143")
  logs = run_remote(remote_command(dry_run("logs.sh")[0][0]), home)
  assert logs.returncode != 0
  assert "step 1 loss 2.5" in logs.stdout


# ---- everything in one go ------------------------------------------------------------------------

def test_run_chains_every_step_and_deletes_the_slice():
  printed, _ = dry_run("run.sh", "--accelerator_type=v5litepod-16", "--spot", "--data_src=gs://b/data",
                       "--", *TRAIN_ARGS)
  kinds = [kind(command) for command in printed]
  assert kinds == ["create", "describe", "describe", "tar", "scp", "ssh", "ssh", "ssh", "ssh", "delete"]
  assert "--spot" in printed[0]
  assert "gcloud storage rsync" in remote_command(printed[6])
  assert started_train_command(printed[7]) == ONE_MACHINE_COMMAND
  assert flag(printed[8], "worker") == "0" and "tail -n +1 -F" in remote_command(printed[8])
  assert all(flag(command, "worker") == "all" for command in printed[4:8])


def test_run_keep_leaves_the_slice():
  printed, result = dry_run("run.sh", "--accelerator_type=v5p-8", "--keep", "--", *TRAIN_ARGS)
  assert "delete" not in [kind(command) for command in printed]
  assert "launch/tpu/delete.sh --name=bbu-run1" in result.stderr


# ---- preemption ----------------------------------------------------------------------------------

def supervise(states, *extra, check_rc=0):
  return dry_run("run_with_preemption.sh", "--accelerator_type=v5litepod-16", "--spot",
                 f"--fake_states={states}", *extra, "--", *TRAIN_ARGS, check_rc=check_rc)


def test_preempted_slice_is_recreated_and_the_same_command_rerun():
  printed, result = supervise(
      "NOT_FOUND,WAITING_FOR_RESOURCES,ACTIVE,ACTIVE,SUSPENDED,WAITING_FOR_RESOURCES,ACTIVE,ACTIVE,ACTIVE:0")
  kinds = [kind(command) for command in printed]
  creates = [i for i, k in enumerate(kinds) if k == "create"]
  deletes = [i for i, k in enumerate(kinds) if k == "delete"]
  starts = [i for i, command in enumerate(printed) if is_train_start(command)]
  assert len(creates) == 2 and len(starts) == 2 and len(deletes) == 2
  # create, train, (preempted) delete, create, train again, (finished) delete
  assert creates[0] < starts[0] < deletes[0] < creates[1] < starts[1] < deletes[1] == len(printed) - 1
  assert printed[creates[0]] == printed[creates[1]]
  assert "--spot" in printed[creates[1]]
  assert printed[starts[0]] == printed[starts[1]]
  assert started_train_command(printed[starts[1]]) == ONE_MACHINE_COMMAND
  # the project is installed again on the new slice before the trainer starts
  assert kinds[starts[1] - 3:starts[1]] == ["tar", "scp", "ssh"]
  assert "recreating it (recreation 1 of at most 20)" in result.stderr
  assert kinds.count("describe") == 9


def test_trainer_killed_by_preemption_is_not_a_failure():
  # The trainer died (SIGTERM, 143) and the slice then shows SUSPENDING: recreate, not give up.
  printed, result = supervise("NOT_FOUND,ACTIVE,ACTIVE:143,SUSPENDING,ACTIVE,ACTIVE:0")
  assert [kind(command) for command in printed].count("create") == 2
  assert sum(is_train_start(command) for command in printed) == 2
  assert "training finished" in result.stderr


def test_trainer_failing_on_a_healthy_slice_stops_the_loop():
  printed, result = supervise("NOT_FOUND,ACTIVE,ACTIVE:1,ACTIVE", check_rc=1)
  kinds = [kind(command) for command in printed]
  assert kinds.count("create") == 1
  assert "tail -n 200" in remote_command(printed[-2])
  assert kinds[-1] == "delete"
  assert "training failed on a healthy slice" in result.stderr


def test_a_launch_that_keeps_failing_on_a_healthy_slice_gives_up(tmp_path):
  # install.sh fails here because --source_dir does not exist: three tries, then stop and delete
  printed, result = supervise("ACTIVE,ACTIVE,ACTIVE", f"--source_dir={tmp_path / 'missing'}", check_rc=1)
  assert "giving up: the launch fails on a healthy slice" in result.stderr
  assert result.stderr.count("launch failed") == 3
  assert [kind(command) for command in printed] == ["describe"] * 3 + ["delete"]


def test_gives_up_after_max_recreates():
  printed, result = supervise("ACTIVE,SUSPENDED,SUSPENDED,SUSPENDED", "--max_recreates=2", check_rc=1)
  assert [kind(command) for command in printed].count("create") == 2
  assert "giving up (--max_recreates=2)" in result.stderr


def test_unknown_state_waits_instead_of_recreating():
  printed, result = supervise("ACTIVE,ACTIVE,UNKNOWN,ACTIVE,ACTIVE:0")
  assert [kind(command) for command in printed].count("create") == 0
  assert "is UNKNOWN; waiting" in result.stderr


def test_fake_state_sequence_running_out_is_an_error():
  _, result = supervise("NOT_FOUND,ACTIVE", check_rc=3)
  assert "ran out after 2 polls" in result.stderr


def test_default_rehearsal_shows_the_happy_path():
  printed, _ = dry_run("run_with_preemption.sh", "--accelerator_type=v6e-8", "--", *TRAIN_ARGS)
  kinds = [kind(command) for command in printed]
  assert kinds[:2] == ["describe", "create"]
  assert kinds[-1] == "delete"
  assert sum(is_train_start(command) for command in printed) == 1


# ---- without --dry_run, against a slice emulated on this machine -----------------------------------

# A `gcloud` whose slice is a directory here: ssh runs the command with HOME set to it, scp copies
# into it, delete stops the trainer and removes it, and describe answers from a list of states
# ("STATE@N" answers once the trainer has saved step N; SUSPENDED also kills the trainer, as a
# preemption does).
_FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_GCLOUD_LOG"
stop_trainer() {
  local pid_file=$FAKE_SLICE_HOME/bbu_run/train.pid
  # the trainer runs in its own session (setsid): its process group is the whole of it
  if [[ -f $pid_file ]]; then kill -TERM -- "-$(cat "$pid_file")" 2>/dev/null || true; fi
}
case "$*" in
  "compute tpus queued-resources describe"*)
    token=$(head -n 1 "$FAKE_STATES_FILE")
    sed -i 1d "$FAKE_STATES_FILE"
    token=${token:-ACTIVE}
    if [[ $token == *@* ]]; then  # STATE@N: answer once the trainer has checkpointed step N
      for _ in $(seq 300); do
        (( $(cat "$FAKE_BUCKET/last_step" 2>/dev/null || echo 0) >= ${token#*@} )) && break
        sleep 0.1
      done
      token=${token%@*}
    fi
    if [[ $token == NOT_FOUND ]]; then
      echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Requested entity was not found." >&2
      exit 1
    fi
    if [[ $token == SUSPENDED ]]; then stop_trainer; fi
    echo "$token" ;;
  "compute tpus queued-resources create"*) mkdir -p "$FAKE_SLICE_HOME" ;;
  "compute tpus queued-resources delete"*) stop_trainer; sleep 0.5; rm -rf "$FAKE_SLICE_HOME" ;;
  "compute tpus tpu-vm scp --recurse"*) cp -r "$6" "$FAKE_SLICE_HOME/${7#*:}" ;;
  "compute tpus tpu-vm ssh"*)
    for arg in "$@"; do
      if [[ $arg == --command=* ]]; then command=${arg#--command=}; fi
    done
    cd "$FAKE_SLICE_HOME" && HOME=$FAKE_SLICE_HOME exec bash -c "$command" ;;
  *) echo "fake gcloud: unexpected $*" >&2; exit 2 ;;
esac
"""

# The workers' python: pip succeeds, and the trainer counts 10 steps, keeping its last finished step in
# output_dir (the checkpoint) and starting after it, as bbu_jax.train resumes from its run folder.
_FAKE_TRAINER_PYTHON = """#!{python}
import os, sys, time
if sys.argv[1:3] == ["-m", "pip"]:
  sys.exit(0)
assert sys.argv[1:3] == ["-m", "bbu_jax.train"], sys.argv
output_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--config.output_dir="))
checkpoint = os.path.join(output_dir, "last_step")
start = int(open(checkpoint).read()) if os.path.exists(checkpoint) else 0
with open(os.path.join(output_dir, "history"), "a") as f:
  f.write(f"start {{start}}\\n")
for step in range(start + 1, 11):
  time.sleep(0.2)
  print(f"step {{step}}", flush=True)
  with open(checkpoint + ".tmp", "w") as f:
    f.write(str(step))
  os.replace(checkpoint + ".tmp", checkpoint)
"""


def emulated_slice(tmp_path, states):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(_FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  python = tmp_path / "worker_python"
  python.write_text(_FAKE_TRAINER_PYTHON.format(python=sys.executable))
  python.chmod(0o755)
  (tmp_path / "states").write_text("".join(state + "\n" for state in states))
  (tmp_path / "bucket").mkdir()
  (tmp_path / "source").mkdir()
  (tmp_path / "source" / "setup.py").write_text("# the project\n")
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"),
         "FAKE_SLICE_HOME": str(tmp_path / "slice"), "FAKE_STATES_FILE": str(tmp_path / "states"),
         "FAKE_BUCKET": str(tmp_path / "bucket"), "TMPDIR": str(tmp_path)}
  args = [*BASE, "--accelerator_type=v5litepod-16", "--spot", "--poll_seconds=0", f"--python={python}",
          f"--source_dir={tmp_path / 'source'}", "--", "--config", "configs/exp.py",
          f"--config.output_dir={tmp_path / 'bucket'}"]
  return env, args


def test_supervisor_recreates_a_preempted_slice_and_the_run_resumes(tmp_path):
  """No dry run: the supervisor against an emulated slice that is preempted mid-run. It recreates the
  slice, reinstalls, reruns the same command; the trainer resumes after its last checkpoint and the
  run ends once, with exit 0 and the slice deleted."""
  env, args = emulated_slice(tmp_path, ["NOT_FOUND", "WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE@2",
                                        "SUSPENDED", "ACTIVE"])
  result = run_script(TPU / "run_with_preemption.sh", *args, env=env)
  assert result.returncode == 0, result.stderr
  history = (tmp_path / "bucket" / "history").read_text().split()
  starts = [int(value) for value in history[1::2]]
  assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < 10, history  # resumed mid-run
  assert (tmp_path / "bucket" / "last_step").read_text() == "10"
  log = (tmp_path / "gcloud.log").read_text().splitlines()
  assert sum(line.startswith("compute tpus queued-resources create") for line in log) == 2
  assert sum(line.startswith("compute tpus queued-resources delete") for line in log) == 2
  assert log[-1].startswith("compute tpus queued-resources delete")
  assert "recreating it" in result.stderr and "training finished" in result.stderr
  assert not (tmp_path / "slice").exists()


def test_run_streams_the_log_and_returns_the_trainer_exit_code(tmp_path):
  env, args = emulated_slice(tmp_path, ["WAITING_FOR_RESOURCES", "ACTIVE"])
  result = run_script(TPU / "run.sh", *args, env=env)
  assert result.returncode == 0, result.stderr
  assert [f"step {step}" for step in range(1, 11)] == [
      line for line in result.stdout.splitlines() if line.startswith("step ")]
  log = (tmp_path / "gcloud.log").read_text().splitlines()
  assert log[0].startswith("compute tpus queued-resources create bbu-run1")
  assert log[-1].startswith("compute tpus queued-resources delete bbu-run1")
  assert not (tmp_path / "slice").exists()


# ---- the real gcloud accepts what the scripts print ----------------------------------------------

def test_gcloud_accepts_every_printed_command(tmp_path):
  """gcloud parses the flags before it asks for credentials: with none configured, a command with a
  flag gcloud does not know fails with "unrecognized arguments", a good one with "no active account"."""
  if shutil.which("gcloud") is None:
    pytest.skip("gcloud is not installed: printed commands are checked against their expected form only")
  printed, _ = supervise("NOT_FOUND,ACTIVE,ACTIVE:1,SUSPENDED,ACTIVE,ACTIVE:0")
  printed += dry_run("data.sh", f"--data_src={tmp_path}")[0]
  representatives = {}
  for command in printed:
    if command[0] == "gcloud":
      representatives.setdefault((kind(command), flag(command, "worker")), command)
  assert {k for k, _ in representatives} == {"create", "describe", "delete", "ssh", "scp"}
  environ = {**os.environ, "HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
             "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
  running = [(command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=environ)) for command in representatives.values()]
  for command, process in running:
    _, stderr = process.communicate(timeout=60)
    assert "active account" in stderr, (command, stderr)
    assert "unrecognized arguments" not in stderr


def test_readme_rehearsal_command_runs():
  """The dry run shown in launch/README.md works as written and passes the train command through."""
  readme = (REPO / "launch" / "README.md").read_text()
  section = readme[readme.index("### 2. Rehearse"):]
  block = section[section.index("```bash") + len("```bash"):section.index("```", section.index("```bash") + 7)]
  words = shlex.split(block.replace("\\\n", " "))
  assert words[0] == "launch/tpu/run.sh" and "--dry_run" in words
  result = subprocess.run(["bash", *words], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  starts = [command for command in commands(result.stdout) if is_train_start(command)]
  assert started_train_command(starts[0]) == ["python3", "-m", "bbu_jax.train", *words[words.index("--") + 1:]]


# ---- GPU: SLURM ----------------------------------------------------------------------------------

SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[01-03],gpu07", "SLURM_JOB_ID": "4242",
             "PYTHONPATH": str(REPO)}


def test_slurm_sets_the_coordinator_from_the_first_node_and_srun_runs_the_same_command():
  result = run_script(GPU / "slurm.sbatch", "--dry_run", "--env=XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
                      "--", *TRAIN_ARGS, env=SLURM_ENV, check_rc=0)
  printed = commands(result.stdout)
  assert printed[0] == ["export", f"JAX_COORDINATOR_ADDRESS=gpu01:{61440 + 4242 % 4096}"]
  assert printed[1] == ["export", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"]
  srun = printed[2]
  assert srun[0] == "srun" and "--ntasks-per-node=1" in srun
  assert srun[srun.index("python"):] == ["python", "-m", "bbu_jax.train", *TRAIN_ARGS]


def test_slurm_port_flag_and_errors():
  result = run_script(GPU / "slurm.sbatch", "--dry_run", "--port", "23456", "--", "--config", "c.py",
                      env=SLURM_ENV, check_rc=0)
  assert "JAX_COORDINATOR_ADDRESS=gpu01:23456" in result.stdout
  environ = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_JOB_NODELIST"}
  outside = run_script(GPU / "slurm.sbatch", "--dry_run", "--", "--config", "c.py",
                       env={**environ, "SLURM_JOB_NODELIST": ""}, check_rc=2)
  assert "submit this with sbatch" in outside.stderr
  assert "unknown argument '--bogus'" in run_script(GPU / "slurm.sbatch", "--bogus", env=SLURM_ENV,
                                                    check_rc=2).stderr
  assert "one task per node" in run_script(GPU / "slurm.sbatch", "--dry_run", "--", "x",
                                           env={**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "8"}, check_rc=2).stderr
  assert run_script(GPU / "slurm.sbatch", "--help", check_rc=0).stdout.startswith("Usage: sbatch")


# ---- GPU: plain ssh ------------------------------------------------------------------------------

def test_multinode_prints_one_ssh_per_host_with_its_process_id():
  result = run_script(GPU / "multinode.sh", "--hosts", "h1,alice@h2,h3", "--coordinator", "h1:1234",
                      "--workdir=/nfs/bbu_jax", "--dry_run", "--", *TRAIN_ARGS, check_rc=0)
  printed = commands(result.stdout)
  assert len(printed) == 3
  for process_id, (command, host) in enumerate(zip(printed, ["h1", "alice@h2", "h3"])):
    assert command[:4] == ["ssh", "-o", "BatchMode=yes", host]
    remote = shlex.split(command[4])
    assert remote[:3] == ["cd", "/nfs/bbu_jax", "&&"]
    assert remote[3] == "env"
    assert {"JAX_COORDINATOR_ADDRESS=h1:1234", "JAX_NUM_PROCESSES=3",
            f"JAX_PROCESS_ID={process_id}"} <= set(remote)
    assert remote[remote.index("python"):] == ["python", "-m", "bbu_jax.train", *TRAIN_ARGS]


def test_multinode_default_coordinator_and_errors():
  result = run_script(GPU / "multinode.sh", "--hosts=bob@n1,n2", "--dry_run", "--", "--config", "c.py",
                      check_rc=0)
  assert "JAX_COORDINATOR_ADDRESS=n1:12355" in result.stdout
  assert "--hosts is required" in run_script(GPU / "multinode.sh", "--dry_run", "--", "x", check_rc=2).stderr
  assert "must be host:port" in run_script(GPU / "multinode.sh", "--hosts=a", "--coordinator=a",
                                           "--dry_run", "--", "x", check_rc=2).stderr
  assert "give the train arguments" in run_script(GPU / "multinode.sh", "--hosts=a", "--dry_run",
                                                  check_rc=2).stderr
  assert run_script(GPU / "multinode.sh", "-h", check_rc=0).stdout.startswith("Usage:")


def test_multinode_runs_every_host_and_reports_a_failure(tmp_path):
  """Without --dry_run, through an `ssh` that runs the remote command here: every process starts
  with its own id, output is prefixed by host, and one failing process fails the launch."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "ssh").write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      # ssh -o OPT ... HOST COMMAND: run COMMAND here, with HOST known to it.
      while [[ $1 == -o ]]; do shift 2; done
      export FAKE_HOST=$1
      exec bash -c "$2"
      """))
  (bin_dir / "ssh").chmod(0o755)
  (tmp_path / "python").write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import os, sys
      print("process", os.environ["JAX_PROCESS_ID"], "of", os.environ["JAX_NUM_PROCESSES"],
            "at", os.environ["JAX_COORDINATOR_ADDRESS"], sys.argv[1:])
      sys.exit(3 if os.environ["FAKE_HOST"] == os.environ.get("FAIL_ON", "") else 0)
      """))
  (tmp_path / "python").chmod(0o755)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
  args = ["--hosts=n1,n2", f"--python={tmp_path / 'python'}", f"--workdir={tmp_path}", "--", "--config", "c.py"]
  ok = run_script(GPU / "multinode.sh", *args, env=env, check_rc=0)
  assert "[0 n1] process 0 of 2 at n1:12355 ['-m', 'bbu_jax.train', '--config', 'c.py']" in ok.stdout
  assert "[1 n2] process 1 of 2 at n1:12355" in ok.stdout
  failed = run_script(GPU / "multinode.sh", *args, env={**env, "FAIL_ON": "n2"}, check_rc=1)
  assert "process 1 on n2 failed" in failed.stderr


# ---- distributed.py ------------------------------------------------------------------------------

from bbu_jax.parallel import distributed  # noqa: E402


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03],gpu07", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("node7", ["node7"]),
    ("a1,b2", ["a1", "b2"]),
    ("gpu[8-10,12]", ["gpu8", "gpu9", "gpu10", "gpu12"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x[3],y-ib[1-2].cluster", ["x3", "y-ib1.cluster", "y-ib2.cluster"]),
])
def test_expand_slurm_nodelist(nodelist, hosts):
  assert distributed.expand_slurm_nodelist(nodelist) == hosts
  assert distributed.first_slurm_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist, message", [
    ("", "empty"), ("gpu[01-03", "without ']'"), ("gpu01]", "without '['"), ("gpu[a-b]", "bad range"),
    ("gpu[5-3]", "runs backwards"), ("a,,b", "empty host name"),
])
def test_expand_slurm_nodelist_errors(nodelist, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    distributed.expand_slurm_nodelist(nodelist)


def test_resolve_from_jax_variables():
  settings = distributed.resolve_settings(environ={
      "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"})
  assert settings == distributed.DistributedSettings("explicit", "10.0.0.1:1234", 4, 3)


def test_resolve_from_slurm():
  environ = {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
             "SLURM_JOB_NODELIST": "gpu[01-03],gpu07", "JAX_COORDINATOR_PORT": "5555"}
  assert distributed.resolve_settings(environ=environ) == distributed.DistributedSettings(
      "explicit", "gpu01:5555", 4, 2)
  # srun's step node list wins over the job's; the default port when none is given
  environ = {**environ, "SLURM_STEP_NODELIST": "n[5-6]"}
  del environ["JAX_COORDINATOR_PORT"]
  assert distributed.resolve_settings(environ=environ).coordinator_address == \
      f"n5:{distributed.DEFAULT_COORDINATOR_PORT}"
  # the coordinator the sbatch script exports wins over the node list
  environ["JAX_COORDINATOR_ADDRESS"] = "gpu01:61517"
  assert distributed.resolve_settings(environ=environ).coordinator_address == "gpu01:61517"


def test_resolve_precedence_arguments_over_environment():
  environ = {"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
             "SLURM_NTASKS": "8", "SLURM_PROCID": "7", "SLURM_JOB_NODELIST": "z1"}
  assert distributed.resolve_settings("b:2", 2, 1, environ=environ) == distributed.DistributedSettings(
      "explicit", "b:2", 2, 1)
  assert distributed.resolve_settings(environ=environ) == distributed.DistributedSettings("explicit", "a:1", 4, 3)


def test_resolve_single_process_cases():
  assert distributed.resolve_settings(environ={}) is None
  assert distributed.resolve_settings(environ={"SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                                               "SLURM_JOB_NODELIST": "n1"}).mode == "single"
  assert distributed.resolve_settings(num_processes=1, environ={}).mode == "single"


@pytest.mark.parametrize("environ, message", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "missing its coordinator address"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "missing its process count and process id"),
    ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "must be host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"process id 2 \(from JAX_PROCESS_ID\) must be in \[0, 2\)"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES must be an integer"),
])
def test_resolve_errors_name_the_setting(environ, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve_settings(environ=environ)


def test_single_process_initialize_is_a_no_op(monkeypatch):
  for name in list(os.environ):
    if name.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_")):
      monkeypatch.delenv(name)
  settings = distributed.initialize_distributed()
  assert settings.mode == "single"
  import jax
  assert not jax.distributed.is_initialized()
  assert distributed.is_main_process()


_WORKER = textwrap.dedent("""\
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import numpy as np
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from bbu_jax.parallel.distributed import initialize_distributed, is_main_process

    settings = initialize_distributed()
    again = initialize_distributed()
    process = jax.process_index()
    gathered = multihost_utils.process_allgather(np.array([process + 1.0]))
    # a jitted sum over an array that lives half on each process: the psum crosses processes
    mesh = Mesh(np.array(jax.devices()), ("processes",))
    local = np.full((1, 3), 10.0 * (process + 1))
    global_array = multihost_utils.host_local_array_to_global_array(local, mesh, PartitionSpec("processes"))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(global_array)
    from jax._src import xla_bridge  # which GPUs this process may use: "all" unless something pinned it
    cuda_visible = getattr(getattr(xla_bridge, "CUDA_VISIBLE_DEVICES", None), "value", "all")
    print("RESULT " + json.dumps({"mode": settings.mode, "cuda_visible": cuda_visible, "again": again.mode, "count": jax.process_count(),
                                  "index": process, "main": is_main_process(),
                                  "gathered": gathered.ravel().tolist(), "sum": float(total)}), flush=True)
    """)


def test_slurm_batch_script_joins_two_processes_through_srun(tmp_path):
  """slurm.sbatch run for real through an `srun` that starts two local tasks the way SLURM does
  (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID): the exported coordinator and the SLURM variables are
  all the trainer gets, the two processes form one jax.distributed run, and neither is pinned to the
  GPU numbered SLURM_LOCALID (one task per host must see all of its GPUs)."""
  worker = tmp_path / "worker.py"
  worker.write_text("import json\n" + _WORKER)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # The "python" given to the script: the real one, except that the trainer is the worker above.
  (bin_dir / "fake_python").write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      if [[ $1 == -m && $2 == bbu_jax.train ]]; then
        shift 2
        echo "train args: $*"
        exec {sys.executable} {worker}
      fi
      exec {sys.executable} "$@"
      """))
  (bin_dir / "srun").write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      # srun --ntasks-per-node=1 --kill-on-bad-exit=1 CMD...: two tasks on this host
      while [[ $1 == --* ]]; do shift; done
      pids=()
      for task in 0 1; do
        SLURM_PROCID=$task SLURM_LOCALID=$task SLURM_NTASKS=2 SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST \
          "$@" > "$SRUN_OUT/task$task.out" 2>&1 &
        pids+=($!)
      done
      status=0
      for pid in "${pids[@]}"; do wait "$pid" || status=1; done
      exit $status
      """))
  for path in bin_dir.iterdir():
    path.chmod(0o755)
  environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
  environ.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
                  "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "5", "SRUN_OUT": str(tmp_path)})
  result = subprocess.run(["bash", str(GPU / "slurm.sbatch"), f"--port={free_port()}",
                           f"--python={bin_dir / 'fake_python'}", "--", "--config", "configs/exp.py"],
                          cwd=REPO, env=environ, capture_output=True, text=True, timeout=120)
  outputs = [(tmp_path / f"task{task}.out").read_text() for task in (0, 1)]
  assert result.returncode == 0, result.stderr + "".join(output[-2000:] for output in outputs)
  for task, output in enumerate(outputs):
    assert "train args: --config configs/exp.py" in output
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    reported = json.loads(line[len("RESULT "):])
    assert reported["mode"] == "explicit" and reported["count"] == 2 and reported["index"] == task
    assert reported["gathered"] == [1.0, 2.0]
    assert reported["sum"] == 90.0
    assert reported["cuda_visible"] == "all"


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_two_processes_on_loopback_see_each_other():
  port = free_port()
  processes = []
  for process_id in range(2):
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
               "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(process_id)}
    processes.append(subprocess.Popen([sys.executable, "-c", "import json\n" + _WORKER], env=environ,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = []
  try:
    for process in processes:
      stdout, stderr = process.communicate(timeout=60)
      assert process.returncode == 0, stderr[-3000:]
      lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
      assert lines, stdout + stderr[-3000:]
      results.append(json.loads(lines[0][len("RESULT "):]))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for process_id, result in enumerate(results):
    assert result["mode"] == "explicit" and result["again"] == "already"
    assert result["count"] == 2 and result["index"] == process_id
    assert result["main"] == (process_id == 0)
    assert result["gathered"] == [1.0, 2.0]
    assert result["sum"] == 3 * 10.0 + 3 * 20.0
