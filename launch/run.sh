#!/usr/bin/env bash
# Train on this machine with the launch file that fits it: CPU or GPU (nvidia-smi lists GPUs), DDP or ZeRO.
# From the repository root (the DeepSpeed launch files name their JSON relative to it):
#
#   launch/run.sh configs/mnist/wae_mmd.yaml                          one process (every GPU under DDP on a GPU box)
#   NPROC=2 launch/run.sh configs/mnist/wae_mmd.yaml train.max_steps=200
#   NPROC=8 MODE=zero3 launch/run.sh configs/celeba64/wae_mmd_resnet.yaml train.global_batch_size=128
#
# Arguments are the trainer's: a config and key=value overrides, passed through unchanged. Environment:
#   NPROC        processes (default: the GPUs nvidia-smi lists, 1 without GPUs)
#   MODE         ddp (default), zero2 or zero3 (DeepSpeed)
#   DEVICE       cpu or gpu (default: gpu when nvidia-smi lists a GPU); cpu forces the CPU launch files
#   MASTER_PORT  rendezvous port (default 29500; set another to run two jobs at once)
#   PYTHON       the interpreter with vegan_scale (default .venv/bin/python when present, else python3)
#   ALLOCATOR    tcmalloc or system (glibc's malloc). Default on CPU: tcmalloc where libtcmalloc_minimal.so.4 is
#                installed (Debian/Ubuntu: libtcmalloc-minimal4), preloaded into every process; glibc's malloc maps
#                and unmaps the large tensors at each step, page faults tcmalloc avoids (bench/allocator.py). A set
#                LD_PRELOAD is kept as it is.
#   DRY_RUN=1    print the command instead of running it
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
usage="usage: [NPROC=N] [MODE=ddp|zero2|zero3] [DEVICE=cpu|gpu] launch/run.sh CONFIG [key=value ...]"
if (($# < 1)); then
  echo "$usage" >&2
  exit 2
fi

gpus=0
if command -v nvidia-smi >/dev/null; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
device=${DEVICE:-$( ((gpus > 0)) && echo gpu || echo cpu)}
mode=${MODE:-ddp}
nproc=${NPROC:-$( ((gpus > 0)) && echo "$gpus" || echo 1)}
if [[ -z ${PYTHON:-} ]]; then
  PYTHON=python3
  if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; fi
fi

case "$device/$mode" in
  cpu/ddp) file=cpu_ddp.yaml ;;
  cpu/zero2) file=cpu_zero2.yaml ;;
  cpu/zero3) file=cpu_zero3.yaml ;;
  gpu/ddp) file=ddp_1node.yaml ;;
  gpu/zero2) file=ds_zero2.yaml ;;
  gpu/zero3) file=ds_zero3.yaml ;;
  *)
    echo "DEVICE=$device MODE=$mode: DEVICE is cpu or gpu, MODE is ddp, zero2 or zero3" >&2
    echo "$usage" >&2
    exit 2
    ;;
esac
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
  echo "NPROC=$nproc: a positive number of processes" >&2
  exit 2
fi
allocator=${ALLOCATOR:-$([[ $device == cpu ]] && echo tcmalloc || echo system)}
if [[ $allocator != tcmalloc && $allocator != system ]]; then
  echo "ALLOCATOR=$allocator: tcmalloc or system" >&2
  exit 2
fi
preload=
if [[ $allocator == tcmalloc && -z ${LD_PRELOAD:-} ]]; then
  library=libtcmalloc_minimal.so.4
  # awk reads the whole list: quitting at the match would end ldconfig by SIGPIPE, which pipefail makes fatal
  preload=$(PATH=$PATH:/sbin:/usr/sbin ldconfig -p 2>/dev/null | awk -v l="$library" '$1 == l && !p { p = $NF } END { print p }')
  if [[ -z $preload ]]; then
    if [[ -n ${ALLOCATOR:-} ]]; then
      echo "ALLOCATOR=tcmalloc: $library is not installed (Debian/Ubuntu: apt-get install" \
        "libtcmalloc-minimal4); or ALLOCATOR=system" >&2
      exit 2
    fi
    allocator=system # the default where it is not installed
  fi
fi
port=${MASTER_PORT:-29500}
if ! [[ $port =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then
  echo "MASTER_PORT=$port: a port number from 1 to 65535" >&2
  exit 2
fi

# torch's launcher, signalled with its processes, kills them 30 s later, often before the checkpoint the signal asks
# for: the stop gets as long as whoever sent the signal allows.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}
if [[ $mode == ddp && $nproc == 1 ]]; then # one process needs no launcher
  cmd=("$PYTHON" -m vegan_scale train "$@")
else
  cmd=(
    "$PYTHON" -m accelerate.commands.launch
    --config_file "$root/launch/accelerate/$file"
    --num_processes "$nproc"
    --main_process_port "$port"
    -m vegan_scale train "$@"
  )
fi
if [[ -n $preload ]]; then cmd=(env "LD_PRELOAD=$preload" "${cmd[@]}"); fi
if [[ -n ${DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
case "${LD_PRELOAD:+set}/$allocator" in
  set/*) memory="LD_PRELOAD as set" ;;
  /tcmalloc) memory="tcmalloc preloaded" ;;
  *) memory="the system's malloc" ;;
esac
echo "launch/run.sh: $nproc process(es), $device, $mode ($file), $memory" >&2
exec "${cmd[@]}"
