#!/usr/bin/env bash
# Starts one run, detached, and answers LABSITE_PID <pid> (or LABSITE_CANCELLED, or
# LABSITE_ERROR <why>). One exec per launch, and safe to run twice: a second launch of the
# same run finds its pid and answers it; one after a cancel finds the `cancelled` marker.
#
# It runs as `bash -c PROGRAM`, PROGRAM being params.sh and this file: bash reads a script
# from a pipe one byte at a time (one read(2) each, so as to leave the rest of stdin to the
# commands it runs), which cost ~2 ms of every launch; from its command line it parses the
# text in memory. The program is the same for every run, and holds nothing of one: seeing it
# in the host's process list shows nothing. The run's parameters (its command and env, which
# may hold secrets) are its stdin, read in blocks by base64: dir (the run directory), command
# (the user's command, written to command.sh as it is), wrapper (the wrapper's own
# parameters, written to the params file for it) and wrapper_script (wrapper.sh, written as
# the run directory's launch.sh). A transfer cut short leaves the JSON unclosed (params
# fails), and the wrapper's last line is checked too: either way nothing starts.
# The launch path is latency-critical: four processes (base64, mkdir, the wrapper's setsid
# and bash), and everything else builtins. One compound command, like the scripts that come
# on stdin (which bash must parse whole before it runs any of it).
{
set -u
umask 077
d=''
pid=''
if ! params || ! path d dir; then
  echo "LABSITE_ERROR the launch parameters are malformed"
  exit 1
fi
if [[ ${P[wrapper_script]-} != *"# end of wrapper.sh%0A" ]]; then
  echo "LABSITE_ERROR the wrapper arrived incomplete"
  exit 1
fi
started() { echo "LABSITE_PID $1"; exit 0; }
mkdir -p "$d" || { echo "LABSITE_ERROR cannot create the run directory"; exit 1; }
[ -e "$d/cancelled" ] && { echo "LABSITE_CANCELLED"; exit 0; }
[ -s "$d/pid" ] && read -r pid < "$d/pid" && started "$pid"
# The lock: whoever creates .launch (O_EXCL under noclobber: atomic, like a mkdir, without a
# process) writes the run directory and starts the wrapper; a concurrent launch waits for the
# pid that one's wrapper writes. It stays, as a record that a launch began (cancel.sh).
set -C
if ! { : > "$d/.launch"; } 2>/dev/null; then
  for ((i = 0; i < 500; i++)); do
    [ -s "$d/pid" ] && read -r pid < "$d/pid" && started "$pid"
    sleep 0.01
  done
  echo "LABSITE_ERROR another launch of this run holds the directory"
  exit 1
fi
set +C
emit command > "$d/command.sh" && emit wrapper > "$d/params" \
  && emit wrapper_script > "$d/launch.sh" \
  || { echo "LABSITE_ERROR cannot write the run directory"; exit 1; }
: >> "$d/output.log"
# The wrapper says its pid on fd 3 as soon as its pid file is written, so nothing polls for
# it; setsid and the redirections detach it from this connection, which it outlives.
exec 3< <(exec setsid bash "$d/launch.sh" 3>&1 > /dev/null 2>&1 < /dev/null)
read -r -t 5 pid <&3 && [ -n "$pid" ] && started "$pid"
[ -s "$d/pid" ] && read -r pid < "$d/pid" && started "$pid"
echo "LABSITE_ERROR the wrapper did not start within 5 s"
exit 1
}; exit
