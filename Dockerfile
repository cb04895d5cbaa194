# The agent's image: Python plus the programs svcproxy runs (ipvsadm; nsenter from
# util-linux for Pod namespaces; ip from iproute2; nft for masquerade rules).
# Not built in this repository's CI: the development machines have no Docker engine.

# The wheel is built apart, with a C compiler, for svcproxy/ipvs/_nlfast.c (the
# netlink encoder's compiled loop); the image itself carries no compiler.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY setup.cfg setup.py pyproject.toml README.md ./
COPY svcproxy ./svcproxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -c 'import zipfile, glob; w = glob.glob("/wheels/svcproxy-*.whl")[0]; \
assert any(n.startswith("svcproxy/ipvs/_nlfast") and n.endswith(".so") for n in zipfile.ZipFile(w).namelist()), \
"the compiled encoder loop was not built"'

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends ipvsadm iproute2 nftables kmod util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/svcproxy-*.whl && rm -rf /wheels
WORKDIR /
ENTRYPOINT ["svcproxy"]
CMD ["run"]
