#!/usr/bin/env bash
# Cancels one run's Slurm job and answers LABSITE_CANCEL term_left=<n> left=<n> (n: the run's
# jobs still in Slurm's queue, pending or running, at the end). Comes on stdin after its
# parameters' line and params.sh, as cancel.sh. Parameters: dir (the run directory), name (the
# job name), job (its id, where known), steps (how long to wait for the job to leave, in 0.1
# s) and conf (SLURM_CONF, or empty). An array's element is cancelled by its id, since all of
# its array share one name.
#
# The `cancelled` marker comes first, so that a submission still on its way (sbatch.sh) starts
# nothing; then scancel by name, which also reaches a job whose id was never recorded.
{
set -u
d=''
name=''
steps=''
conf=''
job=''
if ! params || ! path d dir || ! value name name || ! value steps steps || ! value conf conf \
  || ! value job job \
  || ! [[ $steps =~ ^[0-9]+$ && $name =~ ^labsite-[A-Za-z0-9_-]+$ && $job =~ ^([0-9_]*)$ ]]; then
  echo "LABSITE_ERROR the cancel parameters are malformed"
  exit 1
fi
[ -n "$conf" ] && export SLURM_CONF="$conf"
mkdir -p "$d" && : > "$d/cancelled"
calls=0
# An array's element has its own id (<array>_<k>) and shares its array's name: by id, then.
# A job id recorded in the run directory but not yet known to the server is one too.
[ -z "$job" ] && [ -s "$d/job_id" ] && read -r job < "$d/job_id"
[[ $job =~ ^[0-9_]*$ ]] || job=''
which=(-n "$name")
[[ $job == *_* ]] && which=(-j "$job")
# Slurm not answering is not "nothing left": it is said, and the cancel is tried again.
live() {
  calls=$((calls + 1))
  local out
  out=$(squeue -h -r "${which[@]}" -t PD,CF,R,CG,S,ST,SI,RS,RQ,RH,SO -o %i 2>/dev/null) \
    || { echo "LABSITE_ERROR squeue did not answer"; return 1; }
  [ -z "$out" ] && { echo 0; return; }
  wc -l <<<"$out"
}
# scancel's own status is not the answer (it fails for a job that just ended): squeue is.
if [[ $job == *_* ]]; then
  scancel "$job" 2>/dev/null || :
else
  scancel -n "$name" 2>/dev/null || :
fi
calls=1
# Not in $(...): a subshell's count would not come back.
live > "$d/.live" || { cat "$d/.live"; exit 1; }
read -r first < "$d/.live"
left=$first
# Every half second, not faster: each look is a call to slurmctld, which limits them per user.
for ((i = 0; i < steps && left > 0; i += 5)); do
  sleep 0.5
  live > "$d/.live" || { cat "$d/.live"; exit 1; }
  read -r left < "$d/.live"
done
rm -f "$d/.live"
echo "LABSITE_CALLS $calls"
echo "LABSITE_CANCEL term_left=$first left=$left"
exit 0
}
