#!/usr/bin/env bash
# Detects the cluster a login node submits to, in one round trip: sinfo's nodes and
# partitions (the format is the parameter `format`: clusters.slurm.SINFO_FORMAT), Slurm's
# version, and whether accounting answers (sacct exits 1 where its storage is disabled).
# Comes on stdin after its parameters' line and params.sh, as scancel.sh. Parameters: format
# and conf (SLURM_CONF, or empty: the node's own configuration). Answers
#     LABSITE_VERSION <what sinfo --version prints>
#     LABSITE_ACCOUNTING 0|1
#     LABSITE_SINFO <one line of sinfo>      (one per node and partition)
#     LABSITE_CALLS <n>
# or LABSITE_ERROR <why> when sinfo does not answer.
{
set -u
format=''
conf=''
if ! params || ! value format format || ! value conf conf || ! [[ $format =~ ^[%A-Za-z|]+$ ]]
then
  echo "LABSITE_ERROR the detect parameters are malformed"
  exit 1
fi
[ -n "$conf" ] && export SLURM_CONF="$conf"
command -v sinfo >/dev/null || { echo "LABSITE_ERROR sinfo is not on this node's PATH"; exit 0; }
out=$(sinfo -h -N -o "$format" 2>&1) || { echo "LABSITE_ERROR sinfo: $(tr '\n' ' ' <<<"$out")"; exit 0; }
echo "LABSITE_VERSION $(sinfo --version 2>/dev/null | head -n 1)"
if command -v sacct >/dev/null && sacct -n -X -S now -o JobID >/dev/null 2>&1; then
  echo "LABSITE_ACCOUNTING 1"
else
  echo "LABSITE_ACCOUNTING 0"
fi
while IFS= read -r line; do
  [ -n "$line" ] && echo "LABSITE_SINFO $line"
done <<<"$out"
echo "LABSITE_CALLS 3"
exit 0
}; exit
