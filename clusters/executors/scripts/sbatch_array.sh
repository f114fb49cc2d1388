#!/usr/bin/env bash
# Submits several runs to Slurm as one job array, once, and answers a LABSITE_RUNJOB <i> <job
# id> line per run (or LABSITE_ERROR <why>). Runs as `bash -c PROGRAM` (params.sh and this
# file), its parameters the whole of stdin, like sbatch.sh: count (n), dir_<i>, command_<i> and
# wrapper_<i> for each run i < n (as launch.sh's dir, command and wrapper), wrapper_script,
# list (the array's list of run directories, under the run root), name (the array's job name,
# labsite-array-<a digest of its runs' ids>), throttle (K of --array=0-N%K), args (sbatch's
# other options, NUL-terminated) and conf (SLURM_CONF, or empty).
#
# Element k runs the wrapper of the k-th run not submitted yet, in its own run directory (its
# log, its exit code). A run whose directory already holds a job id (an earlier array) answers
# that id and is not submitted again; an array whose submission may already have happened is
# looked up by its name.
{
set -u
umask 077
name=''
conf=''
n=''
list=''
throttle=''
if ! params || ! value name name || ! value conf conf || ! value n count || ! path list list \
  || ! value throttle throttle \
  || ! [[ $name =~ ^labsite-array-[A-Za-z0-9_-]+$ && $n =~ ^[1-9][0-9]*$ ]] \
  || ! [[ $throttle =~ ^[1-9][0-9]*$ ]]; then
  echo "LABSITE_ERROR the array parameters are malformed"
  exit 1
fi
if [[ ${P[wrapper_script]-} != *"# end of wrapper.sh%0A" ]]; then
  echo "LABSITE_ERROR the wrapper arrived incomplete"
  exit 1
fi
[ -n "$conf" ] && export SLURM_CONF="$conf"
calls=0
dirs=()
for ((i = 0; i < n; i++)); do
  d=''
  path d "dir_$i" || { echo "LABSITE_ERROR the array parameters are malformed"; exit 1; }
  dirs+=("$d")
done
answer() {
  local i job
  echo "LABSITE_CALLS $calls"
  for ((i = 0; i < n; i++)); do
    job=''
    [ -s "${dirs[i]}/job_id" ] && read -r job < "${dirs[i]}/job_id"
    echo "LABSITE_RUNJOB $i $job"
  done
  exit 0
}
# The runs not submitted yet, in order: element k of the array is run ${new[k]}.
new=()
for ((i = 0; i < n; i++)); do
  [ -s "${dirs[i]}/job_id" ] || new+=("$i")
done
[ "${#new[@]}" -gt 0 ] || answer
record() {
  local k
  for ((k = 0; k < ${#new[@]}; k++)); do
    echo "${1}_$k" > "${dirs[${new[k]}]}/job_id"
  done
}
mkdir -p "${list%/*}" || { echo "LABSITE_ERROR cannot create the array's directory"; exit 1; }
job=''
[ -s "$list.job" ] && read -r job < "$list.job" && [ -n "$job" ] && { record "$job"; answer; }
calls=$((calls + 1))
# stderr apart: Slurm prints warnings there even when it succeeds; ids are stdout's lines.
found=$(squeue -h -t all -n "$name" -o %F 2>"$list.err") \
  || { echo "LABSITE_ERROR squeue: $(tr '\n' ' ' < "$list.err")"; exit 1; }
job=''
while read -r line; do
  [[ $line =~ ^[0-9]+$ ]] && { job=$line; break; }
done <<<"$found"
if [ -n "$job" ]; then
  echo "$job" > "$list.job"
  record "$job"
  answer
fi
: > "$list.tmp" || { echo "LABSITE_ERROR cannot write the array's list"; exit 1; }
kept=()
for i in "${new[@]}"; do
  # A run stopped while this was on its way is left out.
  [ -e "${dirs[i]}/cancelled" ] || kept+=("$i")
done
new=("${kept[@]}")
[ "${#new[@]}" -gt 0 ] || answer
for i in "${new[@]}"; do
  d=${dirs[i]}
  mkdir -p "$d" && emit "command_$i" > "$d/command.sh" && emit "wrapper_$i" > "$d/params" \
    && emit wrapper_script > "$d/launch.sh" && : >> "$d/output.log" \
    && printf '%s\n' "$d" >> "$list.tmp" \
    || { echo "LABSITE_ERROR cannot write run directory $i"; exit 1; }
done
mv -f "$list.tmp" "$list"
# Element i reads line i of the list; fd 3 (the wrapper's pid for launch.sh) goes nowhere.
# shellcheck disable=SC2016 # the array's script expands these when it runs, not now
printf '#!/bin/bash\nmapfile -t dirs < %q\nexec bash "${dirs[$SLURM_ARRAY_TASK_ID]}/launch.sh" 3>/dev/null\n' \
  "$list" > "$list.sbatch" || { echo "LABSITE_ERROR cannot write the array's script"; exit 1; }
args=()
if [[ -v "P[args]" ]]; then
  mapfile -d '' -t args < <(emit args)
fi
calls=$((calls + 1))
out=$(sbatch --parsable --job-name="$name" --output="$list-%a.out" --chdir="${list%/*}" \
  --array="0-$((${#new[@]} - 1))%$throttle" "${args[@]}" "$list.sbatch" 2>"$list.err") \
  || { echo "LABSITE_ERROR sbatch: $(tr '\n' ' ' < "$list.err")"; exit 1; }
job=''
while read -r line; do
  [[ ${line%%;*} =~ ^[0-9]+$ ]] && job=${line%%;*}
done <<<"$out"
[ -n "$job" ] || { echo "LABSITE_ERROR sbatch gave no job id: $(tr '\n' ' ' <<<"$out")"; exit 1; }
echo "$job" > "$list.job"
record "$job"
answer
}; exit
