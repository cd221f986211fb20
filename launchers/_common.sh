# shellcheck shell=bash
# Sourced by the launchers (not one itself): argument checks that fail in one line, and the
# quoting of what the launchers pass on. The caller sets USAGE first.

# die MESSAGE...: "<script>: MESSAGE (usage: USAGE)" as one line on stderr, exit status 2.
die() {
  printf '%s: %s (usage: %s)\n' "${0##*/}" "$*" "$USAGE" >&2
  exit 2
}

# ASCII letters and digits, spelled out: a range like [a-z] in a bracket may match more in some
# locales.
_ALNUM=abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789

# shown VALUE: VALUE as bash quotes it, so that any value shows, on the one line, as it is.
shown() { printf '%q' "$1"; }

# need_count NAME VALUE: VALUE is a positive decimal integer. Checked before any arithmetic on it:
# bash evaluates a variable's text in $(( )) and (( )), so a value `x[$(cmd)]` there runs cmd.
need_count() {
  [[ $2 =~ ^[123456789][0123456789]{0,5}$ ]] ||
    die "$1 must be a positive integer, got $(shown "$2")"
}

# need_out_dir VALUE: an OUT_DIR the launchers can pass on to palign (a run dir in a Hydra override
# and a path argument of palign merge). Any character goes except an opening `${`, which Hydra
# would resolve as an interpolation; a leading `-` is taken for a mistyped option.
need_out_dir() {
  [[ -n $1 ]] || die "OUT_DIR is empty"
  [[ $1 != -* ]] || die "unknown option $(shown "$1") (an OUT_DIR starting with '-': write ./$1)"
  # shellcheck disable=SC2016  # a literal ${
  [[ $1 != *'${'* ]] ||
    die "OUT_DIR must not contain '\${' (Hydra reads it as an interpolation), got $(shown "$1")"
}

# need_model VALUE: a model config name (conf/model/NAME.yaml, or a group path a/b).
need_model() {
  local name="[${_ALNUM}_][${_ALNUM}_.-]*"
  [[ $1 =~ ^$name(/$name)*$ ]] ||
    die "MODEL must be a model config name such as llama3_8b (conf/model/), got $(shown "$1")"
}

# sh_word VALUE: VALUE as one word of a POSIX sh command line, as it is when no shell treats any of
# its characters specially, else in single quotes (a ' inside as '\''). Not printf %q: its $'...'
# form (control characters; non-ASCII outside UTF-8 locales) is bash's, and `sbatch --wrap` runs
# its command with #!/bin/sh (dash on Debian/Ubuntu). Never the first word of a command (a = in
# an unquoted first word would make it an assignment).
sh_word() {
  local plain="^[${_ALNUM}_./:,@%+=-]+\$"
  if [[ $1 =~ $plain ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# sh_words VALUE...: each VALUE as one sh word (sh_word), separated by spaces; nothing for none.
sh_words() {
  local word sep=''
  for word in "$@"; do
    printf '%s' "$sep"
    sh_word "$word"
    sep=' '
  done
}

# hydra_value VALUE: VALUE as the value of a Hydra command-line override (key=VALUE) that Hydra's
# override grammar reads back exactly, whatever it holds. A path of letters, digits, _ . / : @ % +
# - and inner spaces stays as it is (Hydra reads it so; it stays readable, and palign's own
# pre-Hydra look at resume= sees the path). Anything else (commas, ; ( ) quotes, * $ \ non-ASCII
# ...) goes in single quotes, with a backslash before each ' and each run of backslashes that
# precedes a ' or the closing quote doubled (Hydra's escaping rules).
hydra_value() {
  local value=$1 out='' run='' char i
  local plain="^[${_ALNUM}_./:@%+-]([${_ALNUM}_./:@%+ -]*[${_ALNUM}_./:@%+-])?\$"
  if [[ $value == */* && $value =~ $plain ]]; then
    printf '%s' "$value"
    return
  fi
  for (( i = 0; i < ${#value}; i++ )); do
    char=${value:i:1}
    if [[ $char == "\\" ]]; then
      run+="\\"
    elif [[ $char == "'" ]]; then
      out+="$run$run\\'"
      run=''
    else
      out+="$run$char"
      run=''
    fi
  done
  printf "'%s'" "$out$run$run"
}
