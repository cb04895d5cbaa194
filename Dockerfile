# The agent's image: Python plus the programs svcproxy runs (ipvsadm; nsenter from
# util-linux for Pod namespaces; ip from iproute2; nft for masquerade rules).
# Not built in this repository's CI: the development machines have no Docker engine.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends ipvsadm iproute2 nftables kmod util-linux \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY svcproxy ./svcproxy
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /
ENTRYPOINT ["svcproxy"]
CMD ["run"]
