#!/usr/bin/env bash
# Cloud TPU VM lifecycle for plug_jax: create -> setup -> run -> sync -> delete.
#
#   launch/tpu_vm.sh create --name N --zone Z --accelerator-type T --version V [--spot]
#                           (T, V: e.g. v4-32 and tpu-ubuntu2204-base)
#   launch/tpu_vm.sh setup  --name N --zone Z (--repo-url URL | --copy)
#   launch/tpu_vm.sh run    --name N --zone Z --workdir gs://BUCKET/PATH [--foreground] -- ARGS...
#   launch/tpu_vm.sh sync   --name N --zone Z --workdir DIR --bucket gs://BUCKET/PATH
#   launch/tpu_vm.sh delete --name N --zone Z
#
# Every subcommand also takes --project P and --dry-run (print each command it would run,
# shell-quoted, one per line, and run nothing); --name, --zone and --project default to $TPU_NAME,
# $ZONE and $PROJECT. `flag=value` works too.
#
# setup puts the code in ~/plug_jax on every worker (git clone/pull of URL, or a copy of this
#   checkout's files that git does not ignore) and installs it with launch/run_tpu.sh.
# run starts `python -m plug_jax.train --workdir DIR ARGS...` on every worker: in the background,
#   logging to ~/plug_jax_logs/train-HOSTNAME.log on each, or attached with --foreground. DIR is
#   a bucket that every worker reads and writes (checkpoints, metrics, the plug, TensorBoard);
#   train refuses a worker-local DIR on a slice of several hosts. A relative DIR (single-host
#   slices) is relative to ~/plug_jax on the workers.
# sync copies a single-host slice's local DIR to the bucket (gsutil -m rsync -r).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "tpu_vm.sh${cmd:+ $cmd}: $*" >&2; exit 2; }
quote() {  # ARGS...: one line that a shell reads back as ARGS
  local line
  printf -v line '%q ' "$@"
  echo "${line% }"
}
run() { if [[ -n $dry_run ]]; then quote "$@"; else "$@"; fi; }
tpu() {  # VERB ARGS...: gcloud compute tpus tpu-vm VERB ARGS... in our zone and project
  run gcloud compute tpus tpu-vm "$@" --zone "$zone" ${project:+--project "$project"}
}
on_workers() {  # WORKER COMMAND: runs a shell command on worker WORKER (a number, or all)
  tpu ssh "$name" --worker="$1" --command "$2"
}
need() {  # VARIABLE...: dies naming the flag of the first one that is empty
  local var hint
  for var; do
    case $var in name) hint=' or TPU_NAME' ;; zone) hint=' or ZONE' ;; *) hint='' ;; esac
    [[ -n ${!var} ]] || die "missing --${var//_/-}$hint (see --help)"
  done
}

cmd=''
case ${1:-} in
  create | setup | run | sync | delete) cmd=$1; shift ;;
  -h | --help) usage; exit 0 ;;
  '' | -*) die "missing subcommand: create, setup, run, sync or delete (see --help)" ;;
  *) die "unknown subcommand $1: create, setup, run, sync or delete (see --help)" ;;
esac

name=${TPU_NAME:-} zone=${ZONE:-} project=${PROJECT:-}
accelerator_type='' version='' repo_url='' workdir='' bucket=''
spot='' copy='' foreground='' dry_run=''
train_args=()
case $cmd in  # the flags each subcommand takes
  create) flags='--accelerator-type --version --spot' ;;
  setup) flags='--repo-url --copy' ;;
  run) flags='--workdir --foreground' ;;
  sync) flags='--workdir --bucket' ;;
  delete) flags='' ;;
esac
flags="--name --zone --project --dry-run $flags"
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --) shift; train_args=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
  esac
  [[ " $flags " == *" $1 "* ]] || die "unknown flag $1 (see --help)"
  var=${1#--}
  var=${var//-/_}  # --accelerator-type sets $accelerator_type
  case $1 in
    --spot | --copy | --foreground | --dry-run) printf -v "$var" 1; shift ;;
    *) [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"; printf -v "$var" '%s' "$2"; shift 2 ;;
  esac
done
((${#train_args[@]} == 0)) || [[ $cmd == run ]] || die "takes no arguments after --"
need name zone

case $cmd in
  create)
    need accelerator_type version
    tpu create "$name" --accelerator-type "$accelerator_type" --version "$version" ${spot:+--spot}
    ;;
  setup)
    [[ -n $repo_url$copy ]] || die "missing --repo-url URL or --copy (see --help)"
    [[ -z $repo_url || -z $copy ]] || die "--repo-url and --copy exclude each other"
    install='cd ~/plug_jax && bash launch/run_tpu.sh --install'
    if [[ -n $copy ]]; then
      # The top-level files and folders that git does not ignore: no .git, no .venv.
      repo=$(cd "$(dirname "$0")/.." && pwd)
      sources=()
      while IFS= read -r entry; do sources+=("$repo/$entry"); done < <(
        git -C "$repo" ls-files --cached --others --exclude-standard | cut -d/ -f1 | sort -u)
      ((${#sources[@]})) || die "--copy found no files: is $repo a git checkout?"
      on_workers all 'mkdir -p ~/plug_jax'
      tpu scp "${sources[@]}" "$name:plug_jax" --recurse --worker=all
      on_workers all "$install"
    else
      fetch="git -C ~/plug_jax pull --ff-only"
      clone="git clone $(quote "$repo_url") ~/plug_jax"
      on_workers all "if [ -d ~/plug_jax/.git ]; then $fetch; else $clone; fi && $install"
    fi
    ;;
  run)
    need workdir
    train=$(quote bash launch/run_tpu.sh plug_jax.train --workdir "$workdir" \
      ${train_args[@]+"${train_args[@]}"})
    if [[ -n $foreground ]]; then
      on_workers all "cd ~/plug_jax && $train"
    else
      # shellcheck disable=SC2016,SC2088  # ~ and $(hostname) are expanded on each worker
      log='~/plug_jax_logs/train-$(hostname).log'
      on_workers all "mkdir -p ~/plug_jax_logs && cd ~/plug_jax && nohup $train > $log 2>&1 < /dev/null &"
      [[ -n $dry_run ]] || echo "started; each worker logs to $log; follow worker 0 with:" \
        "$(quote gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 \
          --command 'tail -f ~/plug_jax_logs/*.log')" >&2
    fi
    ;;
  sync)
    need workdir bucket
    [[ $workdir != gs://* ]] || die "--workdir $workdir is in a bucket already"
    on_workers 0 "cd ~/plug_jax && $(quote gsutil -m rsync -r "$workdir" "$bucket")"
    ;;
  delete)
    tpu delete "$name"
    ;;
esac
