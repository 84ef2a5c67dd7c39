#!/usr/bin/env bash
# Build the bids_siamfuse container image with its OCI labels filled from the checkout.
#
# usage: scripts/build_image.sh [TAG] [extra build arguments...]
#   e.g. scripts/build_image.sh bids_siamfuse:dev --build-arg TORCH_SPEC=torch==2.13.0+cpu
#
# The version label comes from bids_siamfuse/_version.py (the one place it is written; the
# Dockerfile checks that it matches the installed package), the revision from git, the date
# from the clock. Offline inputs are passed as named build contexts when they are found:
#   TEMPLATEFLOW_HOME  holding tpl-MNI152NLin2009aSym  -> --build-context templateflow_home=...
#   SPM_DOWNLOADS      the MATLAB Runtime/SPM12 zips   -> --build-context spm_downloads=...
# Which builder runs:
#   BUILD_SH=../shared/tools/container/build.sh  that script (podman with this lab's fixes:
#                                                 host network, CA bundle, local wheels)
#   BUILDER=docker|podman|buildah                 otherwise (default: the first one found)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="${1:-bids_siamfuse:latest}"
if [ "$#" -gt 0 ]; then shift; fi

version="$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "${root}/bids_siamfuse/_version.py")"
if [ -z "${version}" ]; then
  echo "build_image.sh: cannot read __version__ from bids_siamfuse/_version.py" >&2
  exit 1
fi
revision="$(git -C "${root}" rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "${revision}" != unknown ] && [ -n "$(git -C "${root}" status --porcelain 2>/dev/null)" ]; then
  revision="${revision}-dirty"
fi

args=(
  --build-arg "VERSION=${version}"
  --build-arg "VCS_REF=${revision}"
  --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
)
if [ -n "${TEMPLATEFLOW_HOME:-}" ] && [ -d "${TEMPLATEFLOW_HOME}/tpl-MNI152NLin2009aSym" ]; then
  args+=(--build-context "templateflow_home=$(cd "${TEMPLATEFLOW_HOME}" && pwd)")
fi
if [ -n "${SPM_DOWNLOADS:-}" ] && [ -d "${SPM_DOWNLOADS}" ]; then
  args+=(--build-context "spm_downloads=$(cd "${SPM_DOWNLOADS}" && pwd)")
fi

echo "building ${tag}: bids_siamfuse ${version} (${revision})" >&2
if [ -n "${BUILD_SH:-}" ]; then
  exec "${BUILD_SH}" "${root}" "${tag}" "${args[@]}" "$@"
fi
builder="${BUILDER:-}"
if [ -z "${builder}" ]; then
  for candidate in docker podman buildah; do
    if command -v "${candidate}" >/dev/null 2>&1; then builder="${candidate}"; break; fi
  done
fi
case "${builder}" in
  docker | podman) exec "${builder}" build -t "${tag}" "${args[@]}" "$@" "${root}" ;;
  buildah) exec buildah bud -t "${tag}" "${args[@]}" "$@" "${root}" ;;
  *)
    echo "build_image.sh: no docker, podman or buildah found (set BUILDER or BUILD_SH)" >&2
    exit 1
    ;;
esac
