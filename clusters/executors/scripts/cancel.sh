#!/usr/bin/env bash
# Stops one run: SIGTERM to its process group and to every process that carries its
# LABSITE_RUN_ID (children that left the group, daemonized workers, still have it in
# /proc/PID/environ), a grace period, SIGKILL to what is left; then answers
# LABSITE_CANCEL term_left=<left after the grace> left=<left at the end>.
#
# stdin: LABSITE_PARAMS, params.sh, this file. Parameters: dir (the run directory), run_id,
# steps (the grace, in tenths of a second). One compound command, so a script cut short in
# transfer runs nothing.
{
set -u
d=''
run_id=''
steps=''
if ! params || ! path d dir || ! value run_id run_id || ! value steps steps \
  || ! [[ $steps =~ ^[0-9]+$ && $run_id =~ ^[A-Za-z0-9_-]+$ ]]; then
  echo "LABSITE_ERROR the cancel parameters are malformed"
  exit 1
fi
# The marker stops any launch that comes later (a dispatch still on its way).
mkdir -p "$d" && : > "$d/cancelled"
# A launch that holds the lock is about to write the pid: wait for it (5 s at most).
for ((i = 0; i < 50; i++)); do
  { [ -s "$d/pid" ] || [ ! -e "$d/.launch" ]; } && break
  sleep 0.1
done
pgid=''
[ -s "$d/pid" ] && read -r pgid < "$d/pid"
marker="LABSITE_RUN_ID=$run_id"
members() {
  {
    [ -n "$pgid" ] && ps -e -o pid=,pgid=,stat= | awk -v g="$pgid" '$2 == g && $3 !~ /^Z/ { print $1 }'
    grep -lszaFx -- "$marker" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3
  } | sort -u | grep -vx "$$" || true
}
signal() { for p in $(members); do kill -"$1" "$p" 2>/dev/null || true; done; }
signal TERM
for ((i = 0; i < steps; i++)); do
  [ -z "$(members)" ] && break
  sleep 0.1
done
left=$(members | wc -l)
if [ "$left" -gt 0 ]; then
  signal KILL
  sleep 0.2
fi
echo "LABSITE_CANCEL term_left=$left left=$(members | wc -l)"
exit 0
}
