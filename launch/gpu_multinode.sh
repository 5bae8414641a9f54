#!/usr/bin/env bash
# Multi-node GPU launcher for plug_jax.train through JAX's multi-controller runtime.
#
#   launch/gpu_multinode.sh --ssh --nodes h1,h2 --gpus-per-node 8 --coordinator h1:1234 -- ARGS...
#   launch/gpu_multinode.sh --slurm --nodes h1,h2 --gpus-per-node 8 -- ARGS...
#
# --ssh starts one process per node over ssh, node I of --nodes running
#   python -m plug_jax.train ARGS... --coordinator_address=C --num_processes=N --process_id=I
#   on GPUs 0..G-1 (CUDA_VISIBLE_DEVICES), then waits for all of them.
# --slurm runs srun with one task per GPU (--nodes may be a count here): jax.distributed
#   reads the SLURM variables itself and gives each task the GPU of its local rank, so no
#   coordinator flags are added. Run it inside an allocation (salloc, sbatch) or let srun make one.
# --repo DIR: the checkout on the nodes (default: this one, at the same path on every node).
# --python PY: the interpreter there (default: this venv's python, else python3).
# --dry-run prints each command, shell-quoted, one per line, and runs nothing.
# `flag=value` works too.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }
quote() {  # ARGS...: one line that a shell reads back as ARGS
  local line
  printf -v line '%q ' "$@"
  echo "${line% }"
}

nodes='' gpus_per_node='' coordinator='' ssh='' slurm='' dry_run=''
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}
python=${python:-python3}
train_args=()
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --) shift; train_args=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --ssh | --slurm | --dry-run) var=${1#--}; printf -v "${var//-/_}" 1; shift ;;
    --nodes | --gpus-per-node | --coordinator | --repo | --python)
      [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"
      var=${1#--}
      printf -v "${var//-/_}" '%s' "$2"  # --gpus-per-node sets $gpus_per_node
      shift 2
      ;;
    *) die "unknown flag $1 (plug_jax.train's flags go after --; see --help)" ;;
  esac
done

[[ -n $ssh$slurm ]] || die "missing --ssh or --slurm (see --help)"
[[ -z $ssh || -z $slurm ]] || die "--ssh and --slurm exclude each other"
[[ -n $nodes ]] || die "missing --nodes (see --help)"
[[ -n $gpus_per_node ]] || die "missing --gpus-per-node (see --help)"
[[ $gpus_per_node =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node $gpus_per_node is not a count"
IFS=, read -r -a hosts <<<"$nodes"
for host in "${hosts[@]}"; do [[ -n $host ]] || die "--nodes $nodes has an empty host name"; done
train=("$python" -m plug_jax.train ${train_args[@]+"${train_args[@]}"})

if [[ -n $slurm ]]; then
  [[ -z $coordinator ]] || die "--coordinator is for --ssh: under --slurm JAX finds it itself"
  where=(--nodes="${#hosts[@]}" --nodelist="$nodes")
  if [[ $nodes =~ ^[0-9]+$ ]]; then where=(--nodes="$nodes"); fi  # a count, not host names
  # One task per GPU: under SLURM, jax.distributed.initialize() gives each process one GPU.
  srun=(srun "${where[@]}" --ntasks-per-node="$gpus_per_node" --gpus-per-node="$gpus_per_node"
    --kill-on-bad-exit=1 --chdir="$repo" "${train[@]}")
  if [[ -n $dry_run ]]; then quote "${srun[@]}"; exit 0; fi
  exec "${srun[@]}"
fi

[[ -n $coordinator ]] || die "missing --coordinator HOST:PORT (see --help)"
[[ $coordinator =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator $coordinator is not HOST:PORT"
devices=0
for ((gpu = 1; gpu < gpus_per_node; gpu++)); do devices+=",$gpu"; done
pids=()
for i in "${!hosts[@]}"; do
  remote="cd $(quote "$repo") && $(quote env CUDA_VISIBLE_DEVICES="$devices" "${train[@]}" \
    --coordinator_address="$coordinator" --num_processes="${#hosts[@]}" --process_id="$i")"
  if [[ -n $dry_run ]]; then
    quote ssh -n "${hosts[i]}" "$remote"
  else
    ssh -n "${hosts[i]}" "$remote" &
    pids+=("$!")
  fi
done
[[ -z $dry_run ]] || exit 0
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM  # Ctrl-C ends the ssh sessions
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit "$status"
