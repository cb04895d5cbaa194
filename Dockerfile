# syntax=docker/dockerfile:1
# svcproxy's node agent image: Debian's python3 running svcproxy from a venv, plus the
# programs the agent runs (nft, ip, nsenter, ipvsadm).
#
#   docker build -t REGISTRY/svcproxy:TAG .                       # base: debian:bookworm-slim
#   buildah bud --build-arg BASE=localhost/debian-base -t svcproxy .  # any Debian bookworm base
#
# Nothing but package registries is used: apt (the base's sources) and PyPI. Every Python
# package is pinned with its sha256 in image/requirements.lock (the build stage refuses any
# other download; image/lock rewrites the lock). The test suite builds this file against
# a base made locally with mmdebstrap (tests/image/build).
ARG BASE=debian:bookworm-slim

# ------------------------------------------------------------------------------ build
# Wheels for every dependency (downloaded against the lock's hashes), svcproxy's own
# wheel with its compiled encoder loop (svcproxy/ipvs/_nlfast.c), the list the final
# stage installs from (each wheel by its sha256), and the static CNI plugin
# (`make cni-plugin`: musl, nothing needed on the node to run it).
FROM ${BASE} AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
      make musl-tools libjsmn-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY image/requirements.lock image/build-requirements.lock image/install_list.py image/
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A build behind a TLS-inspecting proxy passes its CA bundle as a build secret:
#   --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip install -q --require-hashes -r image/build-requirements.lock \
 && /opt/build/bin/pip download -q --require-hashes --no-deps -r image/build-requirements.lock -d /wheels/pip \
 && /opt/build/bin/pip wheel -q --require-hashes -r image/requirements.lock --wheel-dir /wheels
COPY setup.cfg setup.py pyproject.toml README.md ./
COPY svcproxy ./svcproxy
COPY Makefile ./
COPY cni ./cni
RUN make cni-plugin
RUN /opt/build/bin/pip wheel -q --no-deps --no-build-isolation --no-index --wheel-dir /wheels . \
 && /opt/build/bin/python image/install_list.py /wheels

# ------------------------------------------------------------------------------ agent
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
# Only what the agent runs: nft (masquerade rules), ip (Pod namespaces), ipvsadm (the
# ipvsadm backend and debugging), nsenter (util-linux, already in the base). No kmod:
# the kernel loads ip_vs, its schedulers, dummy and nf_tables itself when asked for them.
# No docs, man pages or locales (as in Debian's slim images).
RUN printf 'path-exclude=/usr/share/%s/*\n' doc man info locale groff lintian linda \
      > /etc/dpkg/dpkg.cfg.d/svcproxy-slim \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 nftables iproute2 ipvsadm \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/*
# Installed from the build stage's wheels alone (no index), each checked against its
# hash; pip itself runs from its wheel and stays out of the image. Then what the agent
# never runs goes: the kubernetes client's asyncio half (kubernetes.aio, half the image's
# Python) and the packages only it imports (aiohttp and its helpers), and tzdata (Python's
# zoneinfo reads the base's /usr/share/zoneinfo first); the import check after it fails
# the build if any of them is still needed.
# SOURCE_DIGEST: buildah (1.28, Debian 12) reuses a cached layer of a RUN that mounts
# another stage even when that stage changed; tools/image passes the build context's
# digest here so that a changed svcproxy is always installed (BuildKit needs no help).
ARG SOURCE_DIGEST=none
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv --without-pip /opt/svcproxy \
 && pip="/opt/svcproxy/bin/python $(echo /wheels/pip/pip-*.whl)/pip" \
 && $pip install -q --no-cache-dir --no-index --disable-pip-version-check \
      --require-hashes -r /wheels/install.txt \
 && $pip uninstall -q -y --disable-pip-version-check aiohttp aiohttp-retry aiohappyeyeballs \
      aiosignal attrs frozenlist multidict propcache yarl tzdata \
 && rm -rf /opt/svcproxy/lib/python3.11/site-packages/kubernetes/aio \
 && /opt/svcproxy/bin/python -c 'import svcproxy.cli, svcproxy.kube.watch, svcproxy.podns.install, kubernetes.watch, zoneinfo; zoneinfo.ZoneInfo("UTC")' \
 && /opt/svcproxy/bin/svcproxy --version
# install-cni copies it onto the node (svcproxy.podns.install's default plugin path).
COPY --from=build /src/build/svcproxy-cni /usr/lib/svcproxy/svcproxy-cni
ENV PATH=/opt/svcproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /
ENTRYPOINT ["svcproxy"]
CMD ["run"]
# Last, so that a new revision changes no layer above.
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="svcproxy" \
      org.opencontainers.image.description="Kubernetes Service proxy for IPVS (kube-proxy replacement), with Services for Pods that have a network interface of their own" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
