# Sourced by launch/slurm/*.sbatch (not run on its own): stop requests, waiting for the trainer, and the requeue
# decision. The contract with the trainer (vegan_scale.engine.preemption, docs/design.md):
#   * <run_dir>/PREEMPT asks every rank to stop at the next check (every train.check_every steps), after a checkpoint;
#   * the main process writes <run_dir>/exit_status.json {"code", "reason", "step"} last; 75 means "stopped after a
#     checkpoint, continue me", 0 finished. Launchers turn every worker code into 1, so the file is what counts.
# shellcheck shell=bash

PYTHON=${PYTHON:-python}
stop_requests=0 # signals the batch shell received
terminated=0    # 1 after SIGTERM: scancel, preemption or the time limit; such a job is not requeued by this script
run_dir=''
rc=0

note() { echo "[$(date '+%F %T')] sbatch: $*"; }

# Trap handler. Bash runs it as soon as `wait` returns for the signal; it only leaves the flag for the trainer.
request_stop() {
  stop_requests=$((stop_requests + 1))
  if [[ $1 == TERM ]]; then terminated=1; fi
  note "SIG$1 received: asking the trainer to write a checkpoint and stop${run_dir:+ ($run_dir/PREEMPT)}"
  if [[ -n $run_dir ]]; then mkdir -p "$run_dir" && : >"$run_dir/PREEMPT"; fi
}
# Installed first, so that no signal finds bash with its default action (which would end the script at once).
trap 'request_stop USR1' USR1
trap 'request_stop TERM' TERM

# The run directory the trainer will use, and its train.collective_timeout_s (whole seconds), from the resolved
# configuration. This also checks the configuration before anything is launched: a bad key ends the job here with the
# trainer's message and exit code 2.
resolve_run_dir() {
  local resolved
  resolved=$("$PYTHON" -m vegan_scale config "$@") || exit $?
  IFS=$'\t' read -r collective_timeout_s run_dir < <("$PYTHON" -c '
import math, sys, yaml
cfg = yaml.safe_load(sys.stdin)
run = "/".join(str(cfg["run"][k]) for k in ("root", "experiment", "name"))
print(math.ceil(cfg["train"]["collective_timeout_s"]), run, sep="\t")' <<<"$resolved")
}

# torch's launcher, signalled with its processes (scancel, preemption, the time limit), kills them 30 s later
# whatever SLURM allows, often before the checkpoint the signal asks for: give them as long as SLURM's own KillWait
# and GraceTime do.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}

# Processes per node: GPUS_PER_NODE, else the GPUs SLURM gave this node, else the GPUs nvidia-smi lists.
processes_per_node() {
  local n=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  if [[ -z $n ]] && command -v nvidia-smi >/dev/null; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  if ! [[ $n =~ ^[0-9]+$ ]] || ((n == 0)); then
    note "no GPU on this node: request them (sbatch --gpus-per-node=G), or set GPUS_PER_NODE to the processes" \
      "per node (CPU nodes work too: vegan_scale trains on the CPU when there is no GPU)" >&2
    exit 2
  fi
  echo "$n"
}

# The first node of the allocation hosts the rendezvous; never fall back to localhost (the other nodes would hang).
head_node() {
  local head
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST") # whole: `| head -n 1` could end scontrol by SIGPIPE
  head=${head%%$'\n'*}
  if [[ -z $head ]]; then
    note "cannot name the head node of '$SLURM_JOB_NODELIST' (scontrol show hostnames)" >&2
    exit 1
  fi
  echo "$head"
}

# Runs "$@" (the srun step) in the background and waits for it, through any number of stop requests; sets rc.
launch_and_wait() {
  rm -f "$run_dir/exit_status.json" # the previous attempt's; a trainer that dies at start-up writes none
  if ((stop_requests > 0)); then    # asked to stop before anything started: nothing to checkpoint, continue later
    note "stopped before the launch"
    rc=75
    return
  fi
  "$@" &
  local pid=$!
  rc=0
  wait "$pid" || rc=$?
  # A trapped signal cuts `wait` short (rc > 128) while the trainer runs on to its next check and checkpoint.
  # The trainer deletes any PREEMPT it finds when it starts, so a stop asked for during its start-up is asked again
  # until the trainer is running and sees it.
  while ((stop_requests > 0)) && kill -0 "$pid" 2>/dev/null; do
    [[ -e $run_dir/PREEMPT ]] || : >"$run_dir/PREEMPT"
    sleep 1
  done
  if ((stop_requests > 0 && rc > 128)); then
    rc=0
    wait "$pid" || rc=$?
  fi
}

# Reads the trainer's own exit code, requeues the job on 75 (stopped after a checkpoint), exits with the code.
finish() {
  local code=$rc status=$run_dir/exit_status.json
  if [[ -r $status ]]; then
    note "trainer exit status: $(<"$status")"
    code=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["code"])' "$status")
  else
    note "no $status (the trainer did not get as far as writing it); step exit code $rc"
  fi
  if ((code == 75)); then
    if ((terminated)); then
      # SIGTERM is also how `scancel` cancels: requeueing here would make the job impossible to cancel
      note "stopped after SIGTERM: not requeueing; sbatch again with RUN_NAME=$(basename "$run_dir") to continue"
    else
      # the requeue ends this attempt with SIGTERM: from here on that is expected, not a stop request
      trap '' TERM USR1
      note "requeueing job $SLURM_JOB_ID; it continues from the last checkpoint of $run_dir"
      scontrol requeue "$SLURM_JOB_ID" ||
        note "scontrol requeue failed; sbatch again with RUN_NAME=$(basename "$run_dir") to continue"
    fi
  fi
  exit "$code"
}
