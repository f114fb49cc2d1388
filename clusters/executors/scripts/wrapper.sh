#!/usr/bin/env bash
# The run directory's launch.sh, started detached by launch.sh as `setsid bash DIR/launch.sh`
# (the poll knows a live wrapper by that command line). It leads the run's process group,
# runs the command, and writes exit_code atomically when the command ends, whatever it did:
# "pid gone and no exit_code" can then only mean the wrapper itself was killed.
# launch.sh starts it by its absolute path: its directory is the run directory. launch.sh
# writes it from its parameters, and checks that it ends with this file's last line.
d=${0%/*}
# One write(2) of a few bytes, no `mv` process: a reader sees the file empty (no pid yet, as
# every reader takes it) or whole, since a file's size grows only once the bytes are in.
echo $$ > "$d/pid"
# EPOCHREALTIME (bash 5) saves a `date` process; its decimal point follows the locale.
now=${EPOCHREALTIME:-$(date +%s.%N)}
echo "${now/,/.}" > "$d/started_at"
# launch.sh waits on fd 3 for this line. A launcher already gone (its connection cut, or past
# its 5 s) must not take the wrapper with it: no SIGPIPE for this one write. Then fd 3 is
# closed, so that nothing of the run holds it.
trap '' PIPE
{ echo $$ >&3; } 2>/dev/null
trap - PIPE
exec 3>&-

# After exit_code, one line in the host's events file wakes the watcher (watch.sh); a line
# under PIPE_BUF appended with O_APPEND never interleaves with another run's.
# It exits with the command's code too: a Slurm job's state and sacct's ExitCode then say
# what the command did (nothing else reads the wrapper's own status).
finish() {
  printf '%s\n' "$1" > "$d/exit_code.tmp" && mv -f "$d/exit_code.tmp" "$d/exit_code"
  printf '%s\n' "${d##*/}" >> "${d%/*}/.events" 2>/dev/null
  exit "$1"
}
say() { echo "labsite: $*" >> "$d/output.log"; }

# The params file (written by launch.sh, 0600) holds NUL-terminated fields: the workdir,
# env_setup, the number n of the run's own variables, those n NAME=VALUE, then Labsite's.
# NUL is the one byte none of them can hold, so a builtin reads them all, byte for byte.
mapfile -d '' -t f < "$d/params"
if [ "${#f[@]}" -lt 3 ] || ! [[ ${f[2]} =~ ^[0-9]+$ ]] || [ "${#f[@]}" -lt $((3 + f[2])) ]; then
  say "the run's parameters are unreadable"
  finish 125
fi
workdir=${f[0]} setup=${f[1]} n=${f[2]}

if [ -n "$workdir" ]; then
  # `~/` is the host user's home, as in a shell; anything else is taken as it is.
  case $workdir in \~/*) workdir=$HOME/${workdir#\~/} ;; esac
  cd -- "$workdir" 2>> "$d/output.log" || { say "cannot cd to the workdir"; finish 126; }
fi
if [ -n "$setup" ]; then
  # The host's own activation line (set by an admin), run in this shell so `source` works.
  { eval "$setup"; } >> "$d/output.log" 2>&1 || say "env_setup exited $?"
fi
export PYTHONUNBUFFERED=1
# `export "NAME=VALUE"` takes VALUE as it is, never as shell. The run's own variables first,
# then Labsite's (the run id that marks the run's processes, the GPUs its lease pins): last,
# so that a run's env can never override them (the API refuses such names too).
for ((i = 3; i < 3 + n; i++)); do
  export "${f[i]}" || { say "cannot set the run's variable number $((i - 2))"; finish 125; }
done
for ((i = 3 + n; i < ${#f[@]}; i++)); do
  export "${f[i]}" || { say "cannot set ${f[i]%%=*}"; finish 125; }
done
export LABSITE_RUN_DIR="$d"

# A handler (not an ignore, which children would inherit) keeps the wrapper alive on
# SIGTERM to the group, so it outlives the command and still writes its exit code.
trap true TERM INT HUP
bash "$d/command.sh" >> "$d/output.log" 2>&1 < /dev/null &
child=$!
wait "$child"; code=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done
finish "$code"
# launch.sh checks that its copy ends with the next line: keep it last.
# end of wrapper.sh
