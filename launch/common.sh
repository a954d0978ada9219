# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).
#   run CMD ARGS...   prints the command (--dry-run) or runs it
#   fail_usage MSG    "error: MSG" + the valid options, exit 2

DRY_RUN=${DRY_RUN:-0}

# One word, quoted for bash only where it needs quoting.
shell_quote() {
  local word=$1
  if [[ $word =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# The command line, as bash would run it, on one line.
command_line() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s\n' "$out"
}

run() {
  if (( DRY_RUN )); then
    command_line "$@"
  else
    "$@"
  fi
}

fail_usage() {
  echo "error: $1" >&2
  echo "valid options: ${VALID_OPTIONS:-see --help}" >&2
  echo "run with --help for usage" >&2
  exit 2
}

# require VALUE OPTION: fail when VALUE is empty.
require() {
  [[ -n $1 ]] || fail_usage "missing required option $2"
}

# need_value OPTION ARGC: fail when an option that takes a value has none.
need_value() {
  (( $2 >= 2 )) || fail_usage "option $1 needs a value"
}
