#!/usr/bin/env bash
# Build an Apptainer/Singularity image from one of the definitions in singularity/.
#
#   scripts/build_sif.sh image TAG OUT.sif     # singularity/from_image.def, from a local
#                                              # Docker/Podman image (docker/podman save)
#   scripts/build_sif.sh scratch OUT.sif       # singularity/from_scratch.def, no Docker at all
#
# Environment:
#   ENGINE           docker or podman, for `save` (default: whichever is installed)
#   APPTAINER        apptainer or singularity (default: whichever is installed)
#   BUILD_FLAGS      extra `apptainer build` flags, e.g. --fakeroot
#   scratch builds:  TORCH_SPEC, EXTRAS, PIP_FIND_LINKS (a wheel folder), PIP_CERT (a CA
#                    bundle), TEMPLATEFLOW_HOME (a prefetched one; the AAL atlas ships in
#                    the package),
#                    BASE_IMAGE_TAG (a local debian:bookworm-slim to start from when no
#                    registry is reachable; saved and used as a docker-archive)
#   APPTAINER_SH     run apptainer through this wrapper instead, which sees only $CTR_HOME (as
#                    /ctr): what the build needs is staged there first. On the lab machines:
#                    APPTAINER_SH=../shared/tools/container/apptainer.sh (with --fakeroot).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: $0 image TAG OUT.sif | $0 scratch OUT.sif"
mode="${1:?${usage}}"
shift
case "${mode}" in
  image) tag="${1:?${usage}}" out="${2:?${usage}}" ;;
  scratch) out="${1:?${usage}}" ;;
  *) echo "${usage}" >&2; exit 64 ;;
esac
out="$(realpath -m "${out}")"
read -r -a flags <<<"${BUILD_FLAGS:-}"

engine="${ENGINE:-$(command -v docker || command -v podman || true)}"
save() { # save IMAGE ARCHIVE
  if [ -z "${engine}" ]; then echo "no docker or podman to save $1" >&2; exit 69; fi
  "${engine}" save --format docker-archive -o "$2" "$1" 2>/dev/null || "${engine}" save -o "$2" "$1"
}

# Where the build happens: here, or staged under $CTR_HOME for a wrapper that sees only that.
if [ -n "${APPTAINER_SH:-}" ]; then
  : "${CTR_HOME:=/var/tmp/bids-ctr}"
  stage="${CTR_HOME}/build-sif.$$"
  inside="/ctr/build-sif.$$"
  run() { "${APPTAINER_SH}" "cd ${inside} && apptainer $*"; }
else
  stage="$(mktemp -d "${TMPDIR:-/tmp}/build-sif.XXXXXX")"
  inside="${stage}"
  runner="${APPTAINER:-$(command -v apptainer || command -v singularity || true)}"
  if [ -z "${runner}" ]; then echo "apptainer not found" >&2; exit 69; fi
  run() { (cd "${inside}" && eval "\"${runner}\" $*"); }
fi
mkdir -p "${stage}"
trap 'rm -rf "${stage}"' EXIT
q() { printf '%q' "$1"; }

args=()
if [ "${mode}" = image ]; then
  save "${tag}" "${stage}/image.tar"
  cp "${root}/singularity/from_image.def" "${stage}/bids_siamfuse.def"
  args+=(--build-arg BOOTSTRAP=docker-archive --build-arg "IMAGE=$(q "${inside}/image.tar")")
else
  # the same files the Dockerfile uses (.dockerignore's allow-list), nothing else
  mkdir -p "${stage}/scripts"
  cp -r "${root}/pyproject.toml" "${root}/setup.py" "${root}/README.md" "${root}/bids_siamfuse" \
    "${stage}/"
  cp "${root}/scripts/prefetch_data.py" "${stage}/scripts/"
  find "${stage}" -name __pycache__ -prune -exec rm -rf {} +
  cp "${root}/singularity/from_scratch.def" "${stage}/bids_siamfuse.def"
  args+=(--build-arg "TORCH_SPEC=$(q "${TORCH_SPEC:-torch==2.13.0}")")
  if [ -n "${EXTRAS:-}" ]; then args+=(--build-arg "EXTRAS=$(q "${EXTRAS}")"); fi
  if [ -n "${BASE_IMAGE_TAG:-}" ]; then
    save "${BASE_IMAGE_TAG}" "${stage}/base.tar"
    args+=(--build-arg BOOTSTRAP=docker-archive --build-arg "BASE=$(q "${inside}/base.tar")")
  fi
  # mount points /seed/{build,templateflow} are made by the definition's %setup
  mkdir -p "${stage}/host"
  binds=("${inside}/host:/seed/build")
  if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "${PIP_FIND_LINKS}" ]; then
    mkdir -p "${stage}/host/wheels"
    cp -l "${PIP_FIND_LINKS}"/*.whl "${stage}/host/wheels/" 2>/dev/null ||
      cp "${PIP_FIND_LINKS}"/*.whl "${stage}/host/wheels/"
    args+=(--build-arg PIP_FIND_LINKS=/seed/build/wheels)
  fi
  if [ -n "${PIP_CERT:-}" ] && [ -f "${PIP_CERT}" ]; then
    cp "${PIP_CERT}" "${stage}/host/ca.crt"
    args+=(--build-arg PIP_CERT=/seed/build/ca.crt)
  fi
  if [ -n "${TEMPLATEFLOW_HOME:-}" ] && [ -d "${TEMPLATEFLOW_HOME}/tpl-MNI152NLin2009aSym" ]; then
    cp -r "${TEMPLATEFLOW_HOME}" "${stage}/templateflow"
    binds+=("${inside}/templateflow:/seed/templateflow")
  fi
  for bind in "${binds[@]}"; do args+=(--bind "$(q "${bind}")"); done
fi

echo "building ${out} from singularity/$( [ "${mode}" = image ] && echo from_image || echo from_scratch).def" >&2
start=${SECONDS}
run build --force "${flags[@]}" "${args[@]}" bids_siamfuse.sif bids_siamfuse.def
mv "${stage}/bids_siamfuse.sif" "${out}"
echo "built ${out} ($(du -h "${out}" | cut -f1)) in $((SECONDS - start)) s" >&2
