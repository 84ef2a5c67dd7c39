#!/usr/bin/env bash
# Submit a whole bids_siamfuse analysis to SLURM: (validation ->) participant array -> group.
#
#   SIF=/path/bids_siamfuse.sif scripts/submit.sh /data/bids /data/bids/derivatives/bids_siamfuse
#
# Environment (all optional except SIF when ./bids_siamfuse.sif does not exist):
#   PARTICIPANT_ARGS   extra bids_siamfuse arguments for every participant task, e.g. "--sloppy"
#   GROUP_ARGS         extra arguments for the group job (default: "--classes CN AD")
#   PARTICIPANT_SBATCH extra sbatch options for the array, e.g. "--partition=short --mem=24G"
#   GROUP_SBATCH       extra sbatch options for the group job, e.g. "--partition=gpu --gres=gpu:1"
#   MAX_PARALLEL       run at most this many participant tasks at once (--array=1-N%M)
#   VALIDATE=0         skip the one-off validation job (then every task validates the dataset)
#   GROUP_AFTER        afterok (default: the group runs only if every participant succeeded)
#                      or afterany (it runs on whatever succeeded)
#   GPU=1, SCRATCH_ROOT, KEEP_WORK, APPTAINER, PARTICIPANTS_FILE: see slurm_array.sbatch
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage="usage: SIF=IMAGE.sif $0 BIDS_DIR OUTPUT_DIR"
bids="$(realpath "${1:?${usage}}")"
out="$(realpath -m "${2:?${usage}}")"
SIF="$(realpath "${SIF:-bids_siamfuse.sif}")"
export SIF
if [ ! -f "${SIF}" ]; then
  echo "no image at ${SIF}: set SIF=/path/bids_siamfuse.sif" >&2
  exit 66
fi
runner="${APPTAINER:-apptainer}"

n="$(bash "${here}/slurm_array.sbatch" --list "${bids}" | wc -l)"
if [ "${n}" -lt 1 ]; then
  echo "no participants found in ${bids} (participants.tsv or sub-* folders)" >&2
  exit 66
fi
mkdir -p "${out}"

read -r -a participant_args <<<"${PARTICIPANT_ARGS:-}"
read -r -a group_args <<<"${GROUP_ARGS:---classes CN AD}"
read -r -a participant_sbatch <<<"${PARTICIPANT_SBATCH:-}"
read -r -a group_sbatch <<<"${GROUP_SBATCH:-}"

jobid() { cut -d';' -f1; } # sbatch --parsable prints "id" or "id;cluster"

after=()
if [ "${VALIDATE:-1}" = 1 ]; then
  # Validate the dataset once instead of once per task, exactly as the app does (BIDS
  # validator, then pairing and header checks: a --dry-run, which writes nothing); the array
  # waits for it and its log lists every pair that will be processed.
  wrap="$(printf '%q ' "${runner}" run --cleanenv --containall -B "${bids}:/data:ro" \
    -B "${out}:/out" "${SIF}" /data /out participant --dry-run)"
  validate="$(sbatch --parsable --job-name=siamfuse-validate --time=00:30:00 --mem=4G \
    --cpus-per-task=1 --output=siamfuse-validate-%j.log --wrap "${wrap}" | jobid)"
  after=(--dependency="afterok:${validate}")
  participant_args=(--skip-bids-validation "${participant_args[@]}")
  echo "validation job ${validate}"
fi

array="$(sbatch --parsable "${after[@]}" --array="1-${n}${MAX_PARALLEL:+%${MAX_PARALLEL}}" \
  "${participant_sbatch[@]}" "${here}/slurm_array.sbatch" "${bids}" "${out}" \
  "${participant_args[@]}" | jobid)"
echo "participant array ${array}: ${n} tasks"

group="$(sbatch --parsable --dependency="${GROUP_AFTER:-afterok}:${array}" \
  "${group_sbatch[@]}" "${here}/slurm_group.sbatch" "${bids}" "${out}" \
  --skip-bids-validation "${group_args[@]}" | jobid)"
echo "group job ${group} (after ${GROUP_AFTER:-afterok}:${array})"
