#!/bin/bash
# Slurm epilog: removes what the prolog wrote for this job's GPUs — only files that still name this
# job, so a late epilog never erases the record of the job that took the GPU next.
DEST=${CAPMON_GPUSTAT_DIR:-/run/gpustat}
NVIDIA_SMI=${CAPMON_NVIDIA_SMI:-nvidia-smi}
[ -d "$DEST" ] || exit 0
for dev in ${CUDA_VISIBLE_DEVICES//,/ }; do
  names=("$dev")
  case "$dev" in
    MIG-*) ;;
    *[!0-9]*|'') continue ;;
    *) names+=("$("$NVIDIA_SMI" --query-gpu=uuid --format=csv,noheader -i "$dev" 2>/dev/null)") ;;
  esac
  for name in "${names[@]}"; do
    [ -n "$name" ] && [ -f "$DEST/$name" ] || continue
    read -r job _ < "$DEST/$name"
    [ "$job" = "$SLURM_JOB_ID" ] && rm -f "$DEST/$name"
  done
done
exit 0
