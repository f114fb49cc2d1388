# shellcheck shell=bash
# The parameters of the bash script that follows this file (launch.sh, cancel.sh, watch.sh).
# cancel.sh and watch.sh come on stdin, after one generated line, LABSITE_PARAMS=<base64>, and
# this file, all as they are (protocol.py, bash_params_line). launch.sh comes on bash's command
# line, after this file, and its parameters are the whole of its stdin: the same base64, with
# nothing before it (see launch.sh why). The base64 (shell-safe, so the line can only ever be
# an assignment) is of a flat JSON object of strings:
#     {"dir":"~/.labsite/runs/r1","command":"echo %22hi%22%0Asleep 1"}
# where every byte but printable ASCII, and '"', '%' and '\' too, is written %HH. So the
# object splits on '"' alone, a value turns back into its bytes with printf's %b once each %
# is a \x, and no byte of it is ever read as shell: quotes, newlines, `$(...)`, backticks and
# bytes that are not UTF-8 arrive as they were. All of it costs one base64 process, whatever
# the number of parameters: no python, jq or sed on the launch path, which is latency-critical.
# The split is an unquoted expansion: `read` would take a pipe a byte at a time, and
# ${json#*name} is quadratic in bash; this keeps a 100 KB command cheap to unpack.
# The scripts need bash 4.4 (mapfile -d), as poll.py needs Python 3.7: Debian 10, Ubuntu 20.04,
# RHEL 8 and later.

declare -A P=()

# params: fill P (name -> %-encoded value) from LABSITE_PARAMS; fails on anything malformed.
params() {
  local json n i
  local -a f
  if [[ -v LABSITE_PARAMS ]]; then
    json=$(exec base64 -d <<<"$LABSITE_PARAMS") || return 1
  else
    # launch.sh: the parameters are the whole of stdin, read by base64 in blocks.
    json=$(exec base64 -d) || return 1
  fi
  [ "$json" = "{}" ] && return 0
  local IFS='"'
  set -f
  # shellcheck disable=SC2206 # the split on '"' is the point, and globbing is off
  f=($json)
  set +f
  # {"a":"x","b":""} splits into { a : x , b : "" }: 1 + 4 fields per parameter.
  n=${#f[@]}
  [ "$n" -gt 1 ] && [ $(((n - 1) % 4)) -eq 0 ] || return 1
  [ "${f[0]}" = "{" ] && [ "${f[n - 1]}" = "}" ] || return 1
  for ((i = 1; i < n; i += 4)); do
    [[ ${f[i]} =~ ^[a-z_][a-z0-9_]*$ && ${f[i + 1]} == ":" && ${f[i + 2]} != *\\* ]] || return 1
    P[${f[i]}]=${f[i + 2]}
  done
}

# emit NAME: write parameter NAME's bytes to stdout; fails when there is no NAME (NUL bytes too: this is how files are
# written, without a process).
emit() {
  [[ -v "P[$1]" ]] || return 1
  local x='\x'
  printf %b "${P[$1]//%/"$x"}"
}

# value VAR NAME: set VAR to parameter NAME (any bytes but NUL), or fail. Its locals have names no
# caller uses: bash scopes dynamically.
value() {
  [[ -v "P[$2]" ]] || return 1
  local __x='\x'
  printf -v "$1" %b "${P[$2]//%/"$__x"}"
}

# path VAR NAME: value, where a leading `~/` (or a lone `~`) is the host user's $HOME, as in
# a host's run root; a relative path is made absolute (from the directory the script starts
# in, the home directory over SSH), since runs cd to their workdir.
path() {
  value "$1" "$2" || return 1
  local __path=${!1}
  case $__path in
    \~) __path=$HOME ;;
    \~/*) __path=$HOME/${__path#\~/} ;;
    /*) ;;
    *) __path=$PWD/$__path ;;
  esac
  printf -v "$1" %s "$__path"
}
