# syntax=docker/dockerfile:1
#
# bids_siamfuse: a BIDS App fusing T1w MRI and FDG-PET (Arco et al.).
#
#   docker run --rm --gpus all -v /data/bids:/data:ro -v /data/out:/out \
#       bids_siamfuse /data /out participant
#
# Build (docs/containers.md has the details and the measured times):
#   scripts/build_image.sh bids_siamfuse:dev            # labels read from bids_siamfuse/_version.py
#   docker build --build-arg VERSION=X.Y.Z -t bids_siamfuse .
#
# Build arguments
#   TORCH_SPEC             pip requirement for torch; default the CUDA build from PyPI
#                          (torch==2.13.0+cpu with PIP_FIND_LINKS for a CPU-only image)
#   PIP_FIND_LINKS         a folder of local wheels mounted into the build (pip --find-links)
#   EXTRAS                 package extras to install, e.g. "test"
#   WITH_SPM               1: add SPM12 standalone + MATLAB Runtime for --backend spm
#   MCR_SHA256, SPM_SHA256 sha256 of the MATLAB Runtime and SPM12 zips (required with
#                          WITH_SPM=1; every download is checked with sha256sum -c)
#   TEMPLATEFLOW_PREFETCH  auto (default: use TemplateFlow when reachable, else nilearn's
#                          packaged ICBM152 maps), yes (must succeed), no
#   VERSION, VCS_REF, BUILD_DATE   OCI labels; VERSION is checked against the package
# The AAL atlas ships inside the package (bids_siamfuse/data/aal/): nothing to fetch for it.
# Dependencies are installed with constraints.txt (pinned versions, Python 3.11 as in CI).
# Optional named build contexts (--build-context NAME=DIR), for builds without internet:
#   templateflow_home a prefetched TemplateFlow home with tpl-MNI152NLin2009aSym
#   spm_downloads     the MATLAB Runtime and SPM12 standalone zips (with WITH_SPM=1)

ARG BASE_IMAGE=debian:bookworm-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG WITH_SPM=0
ARG MCR_VERSION=v97

# Empty stand-ins for the optional named build contexts (a context of the same name wins).
FROM scratch AS templateflow_home
FROM scratch AS spm_downloads

# ---------------------------------------------------------------------------------------------
# base: Debian bookworm with its Python 3.11, nothing else
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    PYTHONUNBUFFERED=1
# Unpinned on purpose: bookworm point releases replace package versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
# deps: a virtual environment with torch and the dependencies from pyproject.toml (the package
# itself goes in last, in its own small layer, so code changes do not rebuild or re-ship these)
FROM base AS deps
ARG TORCH_SPEC
ARG PIP_FIND_LINKS
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv
# torch first and alone: the largest layer, rebuilt only when TORCH_SPEC changes
# (the version is pinned by the TORCH_SPEC build argument, which hadolint cannot see)
# hadolint ignore=DL3013
RUN pip install "${TORCH_SPEC}"
# then the dependencies listed in pyproject.toml at the versions of constraints.txt (cached
# until either changes); setuptools and wheel too, so the package installs below need no
# build isolation
COPY pyproject.toml constraints.txt /src/
ARG EXTRAS=""
RUN python3 -c 'import os, tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb")); extras = os.environ.get("EXTRAS", "").replace(",", " ").split(); print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"] + [d for e in extras for d in p["project"]["optional-dependencies"][e]]))' > /tmp/requirements.txt \
    && pip install -c /src/constraints.txt -r /tmp/requirements.txt \
    && rm -rf /src /tmp/requirements.txt \
    && python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# ---------------------------------------------------------------------------------------------
# data: the templates, fetched now so that nothing downloads at run time, then checked (with
# the packaged AAL atlas) by the package's own loaders
FROM deps AS data
ARG PIP_CERT
ARG TEMPLATEFLOW_PREFETCH=auto
COPY pyproject.toml setup.py README.md /src/
COPY bids_siamfuse /src/bids_siamfuse
COPY scripts/prefetch_data.py /src/scripts/prefetch_data.py
RUN --mount=type=bind,from=templateflow_home,target=/seed/templateflow \
    pip install --no-deps --no-build-isolation /src \
    && if [ -n "${PIP_CERT:-}" ]; then export REQUESTS_CA_BUNDLE="${PIP_CERT}"; fi \
    && python3 /src/scripts/prefetch_data.py \
         --templateflow-home /opt/data/templateflow \
         --templateflow-seed /seed/templateflow \
         --templateflow "${TEMPLATEFLOW_PREFETCH}" \
         --manifest /opt/data/prefetch.json

# ---------------------------------------------------------------------------------------------
# spm (optional, WITH_SPM=1): SPM12 standalone + MATLAB Runtime, laid out as Clinica expects:
# SPMSTANDALONE_HOME holds run_spm12.sh, MCR_HOME is the runtime root; the SPM command is
# "$SPMSTANDALONE_HOME/run_spm12.sh $MCR_HOME script". Without WITH_SPM=1 /opt/spm stays empty.
FROM base AS spm
ARG WITH_SPM
ARG MCR_VERSION
ARG PIP_CERT
ARG MCR_URL=https://ssd.mathworks.com/supportfiles/downloads/R2019b/Release/9/deploy/MATLAB_Runtime_R2019b_Update_9_glnxa64.zip
ARG SPM_URL=https://www.fil.ion.ucl.ac.uk/spm/download/restricted/bids/spm12_r7771_Linux_R2019b.zip
# sha256 of both archives (required with WITH_SPM=1: the build fails without them, and when a
# download does not match). Not pinned here because they could not be verified offline when
# this was written; record them once from a trusted download (sha256sum *.zip) and pass them
# with --build-arg, or set them in scripts/build_image.sh. docs/containers.md says more.
ARG MCR_SHA256=""
ARG SPM_SHA256=""
ENV MCR_INHIBIT_CTF_LOCK=1 \
    SPM_HTML_BROWSER=0
# hadolint ignore=DL3008,SC2086
RUN --mount=type=bind,from=spm_downloads,target=/downloads \
    mkdir -p /opt/spm \
    && if [ "${WITH_SPM}" != 1 ]; then echo "SPM12 not included (WITH_SPM=${WITH_SPM})"; exit 0; fi \
    && if [ -z "${MCR_SHA256}" ] || [ -z "${SPM_SHA256}" ]; then \
         echo "WITH_SPM=1 needs --build-arg MCR_SHA256=... and SPM_SHA256=... (sha256 of the archives)" >&2; \
         exit 1; fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl unzip \
         libxext6 libxt6 libxmu6 libxpm4 libncurses5 \
    && fetch() { \
         if [ -f "/downloads/${1##*/}" ]; then cp "/downloads/${1##*/}" "$2"; \
         else curl -fsSL --retry 3 ${PIP_CERT:+--cacert "$PIP_CERT"} -o "$2" "$1"; fi; \
       } \
    && fetch "${MCR_URL}" /tmp/mcr.zip \
    && echo "${MCR_SHA256}  /tmp/mcr.zip" | sha256sum -c - \
    && unzip -q /tmp/mcr.zip -d /tmp/mcr_install \
    && /tmp/mcr_install/install -mode silent -agreeToLicense yes -destinationFolder /opt/spm/mcr \
    && fetch "${SPM_URL}" /tmp/spm12.zip \
    && echo "${SPM_SHA256}  /tmp/spm12.zip" | sha256sum -c - \
    && unzip -q /tmp/spm12.zip -d /opt/spm \
    && chmod +x /opt/spm/spm12/run_spm12.sh /opt/spm/spm12/spm12 \
    && /opt/spm/spm12/run_spm12.sh "/opt/spm/mcr/${MCR_VERSION}" function exit \
    && /opt/spm/spm12/run_spm12.sh "/opt/spm/mcr/${MCR_VERSION}" --version \
    && chmod -R a+rX /opt/spm \
    && rm -rf /tmp/mcr.zip /tmp/mcr_install /tmp/spm12.zip /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
# runtime: the app, its data, a non-root user; runs with a read-only root file system
FROM base AS runtime
ARG WITH_SPM
ARG MCR_VERSION
ARG TORCH_SPEC
# hadolint ignore=DL3008
RUN if [ "${WITH_SPM}" = 1 ]; then \
         apt-get update \
         && apt-get install -y --no-install-recommends libxext6 libxt6 libxmu6 libxpm4 libncurses5 \
         && rm -rf /var/lib/apt/lists/*; \
       fi \
    && groupadd --gid 1000 siamfuse \
    && useradd --no-log-init --uid 1000 --gid 1000 --home-dir /tmp --no-create-home \
         --shell /bin/bash siamfuse
COPY --from=deps /opt/venv /opt/venv
COPY --from=data /opt/data /opt/data
COPY --from=spm /opt/spm /opt/spm
# the package from this checkout, non-editable, in a small layer of its own
COPY pyproject.toml setup.py README.md LICENSE /src/
COPY bids_siamfuse /src/bids_siamfuse
ARG VERSION=""
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src \
    && rm -rf /src \
    && /opt/venv/bin/pip check \
    && installed="$(/opt/venv/bin/python3 -c 'import bids_siamfuse; print(bids_siamfuse.__version__)')" \
    && if [ -n "${VERSION}" ] && [ "${VERSION}" != "${installed}" ]; then \
         echo "build arg VERSION=${VERSION} but bids_siamfuse/_version.py says ${installed}" >&2; \
         exit 1; \
       fi
# Everything a run writes goes to OUTPUT_DIR, the work directory (-w), /tmp or $HOME.
# HOME=/tmp keeps matplotlib (~/.config, ~/.cache), nipype (~/.nipype), deno and torch caches
# writable under --read-only with a tmpfs on /tmp; Apptainer sets HOME itself.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    TEMPLATEFLOW_HOME=/opt/data/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    BIDS_SIAMFUSE_CONTAINER_TAG=bids_siamfuse:${VERSION:-dev} \
    NIPYPE_NO_ET=1 \
    SPMSTANDALONE_HOME=/opt/spm/spm12 \
    MCR_HOME=/opt/spm/mcr/${MCR_VERSION} \
    MCR_INHIBIT_CTF_LOCK=1 \
    SPM_HTML_BROWSER=0
WORKDIR /tmp
USER 1000:1000
# label values change with every build: declared last so the layers above stay cached
ARG VCS_REF=""
ARG BUILD_DATE=""
LABEL org.opencontainers.image.title="bids_siamfuse" \
      org.opencontainers.image.description="BIDS App fusing T1w MRI and FDG-PET with region-wise siamese networks and attention to stage Alzheimer's disease" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/bids-siamfuse/bids_siamfuse" \
      org.opencontainers.image.url="https://github.com/bids-siamfuse/bids_siamfuse" \
      org.opencontainers.image.documentation="https://github.com/bids-siamfuse/bids_siamfuse/blob/main/docs/containers.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.authors="The bids_siamfuse developers" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim" \
      org.bids-siamfuse.torch="${TORCH_SPEC}" \
      org.bids-siamfuse.spm12="${WITH_SPM}"
ENTRYPOINT ["bids_siamfuse"]
CMD ["--help"]
