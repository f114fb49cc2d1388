#!/usr/bin/env bash
# Streams the directory name of each run whose command ends on this host, as it ends.
#
# stdin: LABSITE_PARAMS, params.sh, this file, then nothing: stdin stays open while the
# watcher holds the channel. Parameters: events (the host's events file, beside the run
# directories, that each wrapper appends to), beat (seconds between heartbeats).
#
# `tail -F` follows the events file (inotify where the kernel has it), from the size it had
# before the ready line: nothing appended after that line is missed. EOF on stdin (the watcher
# went away) ends the script and its tail, so no follower outlives the connection; a tail that
# died ends the script too (within a second), so the watcher starts a new one. A heartbeat
# line every `beat` seconds lets the watcher tell a quiet host from a dead connection.
# The body is one compound command, so bash parses it before `read` touches stdin, and it
# ends in `exit`: bash -s would otherwise wait on stdin for more script.
{
set -u
umask 077
f=''
beat=''
if ! params || ! path f events || ! value beat beat || ! [[ $beat =~ ^[1-9][0-9]*$ ]]; then
  exit 1
fi
mkdir -p "${f%/*}" && : >> "$f" || exit 1
n=$(wc -c < "$f")
tail -c +$((n + 1)) -F "$f" 2>/dev/null &
t=$!
trap 'kill $t 2>/dev/null' EXIT
trap '' PIPE
echo LABSITE_WATCHING
i=0
while :; do
  read -r -t 1 _
  rc=$?
  [ "$rc" -gt 128 ] || break
  kill -0 "$t" 2>/dev/null || break
  i=$((i + 1))
  [ "$i" -lt "$beat" ] && continue
  i=0
  echo LABSITE_ALIVE || break
done
exit 0
}
