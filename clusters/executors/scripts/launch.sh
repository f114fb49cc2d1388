#!/usr/bin/env bash
# Starts one run, detached, and answers LABSITE_PID <pid> (or LABSITE_CANCELLED, or
# LABSITE_ERROR <why>). One exec per launch, and safe to run twice: a second launch of the
# same run finds its pid and answers it; one after a cancel finds the `cancelled` marker.
#
# stdin: LABSITE_PARAMS, params.sh, this file, then wrapper.sh, which this copies into the run
# directory as its launch.sh. Parameters: dir (the run directory), command (the user's
# command, written to command.sh as it is), wrapper (the wrapper's own parameters, written to
# the params file for it).
#
# The body is one compound command: bash -s reads a script from a pipe a byte at a time, so it
# parses all of it before `cat` takes the rest of stdin, and the `exit` at its end keeps bash
# from ever running that rest itself. A `cat` costs no decoding and no byte-by-byte reading;
# the copy's last line is checked, so a transfer cut short starts nothing.
# The launch path is latency-critical: four processes (base64, mkdir, cat, the wrapper), and
# everything else builtins.
{
set -u
umask 077
d=''
pid=''
if ! params || ! path d dir; then
  echo "LABSITE_ERROR the launch parameters are malformed"
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
  || { echo "LABSITE_ERROR cannot write the run directory"; exit 1; }
cat > "$d/launch.sh"
mapfile -t w < "$d/launch.sh"
if [ "${w[${#w[@]} - 1]-}" != "# end of wrapper.sh" ]; then
  # Not all of it came: let a later launch (the dispatch is retried) take the lock again.
  rm -f "$d/launch.sh" "$d/.launch"
  echo "LABSITE_ERROR the wrapper arrived incomplete"
  exit 1
fi
: >> "$d/output.log"
# The wrapper says its pid on fd 3 as soon as its pid file is written, so nothing polls for
# it; setsid and the redirections detach it from this connection, which it outlives.
exec 3< <(exec setsid bash "$d/launch.sh" 3>&1 > /dev/null 2>&1 < /dev/null)
read -r -t 5 pid <&3 && [ -n "$pid" ] && started "$pid"
[ -s "$d/pid" ] && read -r pid < "$d/pid" && started "$pid"
echo "LABSITE_ERROR the wrapper did not start within 5 s"
exit 1
}; exit
