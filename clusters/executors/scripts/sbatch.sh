#!/usr/bin/env bash
# Submits one run to Slurm, once, and answers LABSITE_JOB <job id> (or LABSITE_CANCELLED, or
# LABSITE_ERROR <why>). Runs as `bash -c PROGRAM` (params.sh and this file), its parameters
# the whole of stdin, like launch.sh (see there why): dir (the run directory, on the cluster's
# shared filesystem), command, wrapper and wrapper_script (as for launch.sh), name (the job
# name, labsite-<run id>), args (sbatch's options, NUL-terminated: passed as words, never as
# shell) and conf (SLURM_CONF for the client commands, or empty).
#
# Safe to run twice: a run that may already have been submitted (a worker killed mid-submit)
# is looked up first, by the job id it recorded, then (where its run directory was there
# already) by its job name in squeue, so it is submitted once. The job runs the same wrapper
# as every other host's runs (it writes pid, started_at and exit_code in the run directory);
# Slurm pins its GPUs, so the wrapper's parameters set no CUDA_VISIBLE_DEVICES.
{
set -u
umask 077
d=''
name=''
conf=''
if ! params || ! path d dir || ! value name name || ! value conf conf \
  || ! [[ $name =~ ^labsite-[A-Za-z0-9_-]+$ ]]; then
  echo "LABSITE_ERROR the submit parameters are malformed"
  exit 1
fi
if [[ ${P[wrapper_script]-} != *"# end of wrapper.sh%0A" ]]; then
  echo "LABSITE_ERROR the wrapper arrived incomplete"
  exit 1
fi
[ -n "$conf" ] && export SLURM_CONF="$conf"
# How many Slurm commands this made, for the host's calls-per-minute figure.
calls=0
answer() { echo "LABSITE_CALLS $calls"; echo "LABSITE_JOB $1"; exit 0; }
# A run directory made now had no submission before this one: no lookup, one Slurm call fewer
# (clusters limit each user's calls). One that was there may have (a worker killed mid-submit).
fresh=1
[ -d "$d" ] && fresh=0
mkdir -p "$d" || { echo "LABSITE_ERROR cannot create the run directory"; exit 1; }
[ -e "$d/cancelled" ] && { echo "LABSITE_CANCELLED"; exit 0; }
job=''
[ -s "$d/job_id" ] && read -r job < "$d/job_id" && [ -n "$job" ] && answer "$job"
if [ "$fresh" = 0 ]; then
  # Submitted before the job id was recorded: squeue knows the job by its name.
  calls=$((calls + 1))
  # stderr apart: Slurm prints warnings there even when it succeeds; ids are stdout's lines.
  found=$(squeue -h -t all -n "$name" -o %i 2>"$d/.slurm.err") \
    || { echo "LABSITE_ERROR squeue: $(tr '\n' ' ' < "$d/.slurm.err")"; exit 1; }
  job=''
  while read -r line; do
    [[ $line =~ ^[0-9]+(_[0-9]+)?$ ]] && { job=$line; break; }
  done <<<"$found"
  if [ -n "$job" ]; then
    echo "$job" > "$d/job_id"
    answer "$job"
  fi
fi
emit command > "$d/command.sh" && emit wrapper > "$d/params" \
  && emit wrapper_script > "$d/launch.sh" \
  || { echo "LABSITE_ERROR cannot write the run directory"; exit 1; }
: >> "$d/output.log"
# The batch script starts the wrapper; fd 3, where the wrapper says its pid to launch.sh, goes
# nowhere here.
printf '#!/bin/bash\nexec bash %q 3>/dev/null\n' "$d/launch.sh" > "$d/job.sbatch" \
  || { echo "LABSITE_ERROR cannot write the run directory"; exit 1; }
args=()
if [[ -v "P[args]" ]]; then
  mapfile -d '' -t args < <(emit args)
fi
# A stop that came while this was on its way: nothing is submitted.
[ -e "$d/cancelled" ] && { echo "LABSITE_CANCELLED"; exit 0; }
calls=$((calls + 1))
out=$(sbatch --parsable --job-name="$name" --output="$d/slurm.out" --chdir="$d" \
  "${args[@]}" "$d/job.sbatch" 2>"$d/.slurm.err") \
  || { echo "LABSITE_ERROR sbatch: $(tr '\n' ' ' < "$d/.slurm.err")"; exit 1; }
job=''
while read -r line; do
  [[ ${line%%;*} =~ ^[0-9]+$ ]] && job=${line%%;*}
done <<<"$out"
# Taken (exit 0) but no id on stdout: look it up by name, as a retry would.
if [ -z "$job" ]; then
  calls=$((calls + 1))
  found=$(squeue -h -t all -n "$name" -o %i 2>/dev/null) || found=''
  while read -r line; do
    [[ $line =~ ^[0-9]+$ ]] && { job=$line; break; }
  done <<<"$found"
fi
[ -n "$job" ] || { echo "LABSITE_ERROR sbatch gave no job id: $(tr '\n' ' ' <<<"$out")"; exit 1; }
echo "$job" > "$d/job_id"
answer "$job"
}; exit
