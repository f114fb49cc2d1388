#!/usr/bin/env bash
# Cancels one run's Slurm job and answers LABSITE_CANCEL term_left=<n> left=<n> (n: the run's
# jobs still in Slurm's queue, pending or running, at the end). Comes on stdin after its
# parameters' line and params.sh, as cancel.sh. Parameters: dir (the run directory), name (the
# job name), steps (how long to wait for the job to leave, in 0.1 s) and conf (SLURM_CONF, or
# empty).
#
# The `cancelled` marker comes first, so that a submission still on its way (sbatch.sh) starts
# nothing; then scancel by name, which also reaches a job whose id was never recorded.
{
set -u
d=''
name=''
steps=''
conf=''
if ! params || ! path d dir || ! value name name || ! value steps steps || ! value conf conf \
  || ! [[ $steps =~ ^[0-9]+$ && $name =~ ^labsite-[A-Za-z0-9_-]+$ ]]; then
  echo "LABSITE_ERROR the cancel parameters are malformed"
  exit 1
fi
[ -n "$conf" ] && export SLURM_CONF="$conf"
mkdir -p "$d" && : > "$d/cancelled"
live() { squeue -h -n "$name" -t PD,CF,R,CG,S,ST,SI,RS,RQ,RH,SO -o %i 2>/dev/null | wc -l; }
scancel -n "$name" 2>/dev/null
first=$(live)
for ((i = 0; i < steps; i++)); do
  [ "$(live)" -eq 0 ] && break
  sleep 0.1
done
echo "LABSITE_CANCEL term_left=$first left=$(live)"
exit 0
}
