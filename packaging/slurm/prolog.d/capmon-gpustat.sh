#!/bin/bash
# Slurm prolog (runs as root on the node before the job): one file per GPU the job was given, named
# by its UUID (GPU-… or MIG-…) and by the ordinal Slurm set, holding "<job id> <uid>" — the
# convention of Princeton's jobstats, which capmon's slurm source reads from jobstats_dir.
DEST=${CAPMON_GPUSTAT_DIR:-/run/gpustat}
NVIDIA_SMI=${CAPMON_NVIDIA_SMI:-nvidia-smi}
mkdir -p -m 755 "$DEST" || exit 0
for dev in ${CUDA_VISIBLE_DEVICES//,/ }; do
  case "$dev" in
    MIG-*) echo "$SLURM_JOB_ID $SLURM_JOB_UID" > "$DEST/$dev" ;;
    *[!0-9]*|'') ;;
    *)
      echo "$SLURM_JOB_ID $SLURM_JOB_UID" > "$DEST/$dev"
      uuid=$("$NVIDIA_SMI" --query-gpu=uuid --format=csv,noheader -i "$dev" 2>/dev/null)
      case "$uuid" in GPU-*) echo "$SLURM_JOB_ID $SLURM_JOB_UID" > "$DEST/$uuid" ;; esac
      ;;
  esac
done
exit 0  # never fail the job for want of a record
