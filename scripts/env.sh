# Puts embedjob (.venv/bin), kubectl and helm (~/.cache/embedjob/bin, where scripts/setup.sh puts them
# when the machine has none) on PATH in the current shell. Source it from the repository root:
#
#   . scripts/env.sh
#
# Idempotent; prints where each command now comes from.
_ej_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
_ej_cache="${EMBEDJOB_CACHE:-$HOME/.cache/embedjob}"
case ":$PATH:" in *":$_ej_root/.venv/bin:"*) ;; *) PATH="$_ej_root/.venv/bin:$PATH" ;; esac
case ":$PATH:" in *":$_ej_cache/bin:"*) ;; *) PATH="$PATH:$_ej_cache/bin" ;; esac
export PATH
for _ej_cmd in embedjob kubectl helm; do
  echo "env.sh: $_ej_cmd: $(command -v "$_ej_cmd" || echo 'MISSING: run scripts/setup.sh')" >&2
done
unset _ej_root _ej_cache _ej_cmd
