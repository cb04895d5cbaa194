# The README's first two commands: `make demo` and `make test`. Both work from a
# fresh clone as root on Debian with nothing but python3 installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-host test-kernel test-kernel-module host-deps lint typecheck bench clean image image-dir

# setup.py builds svcproxy/ipvs/_nlfast.c (the netlink encoder's compiled loop) in place.
$(STAMP): setup.cfg setup.py pyproject.toml svcproxy/ipvs/_nlfast.c
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq python3-venv python3-pip >/dev/null)
	@# A C compiler and Python's headers for the compiled encoder loop (optional for the
	@# package, but tests/test_nlfast.py fails without it).
	@command -v cc >/dev/null && $(PYTHON) -c 'import os, sys, sysconfig; \
	  sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || \
	  [ "$$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq gcc python3-dev >/dev/null) || true
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	@# Plans node-a's table here, then boots a VM with IPVS and runs the example
	@# cluster end to end (tools/demo --no-vm: the plan only).
	tools/demo $(DEMO_ARGS)

test: test-host test-kernel

# nft and ip for the host tests that run the real nft in a namespace of their own
# (they skip, saying why, where these are missing and cannot be installed).
host-deps:
	@command -v nft >/dev/null && command -v ip >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends nftables iproute2 >/dev/null) || true
	@# valgrind for tests/test_cni_static.py's run of the CNI plugin under memcheck.
	@command -v valgrind >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends valgrind >/dev/null) || true

test-host: $(STAMP) host-deps
	$(PY) -m mypy --strict svcproxy
	$(PY) -m pytest -q tests

# The agent's image (tools/image: built with buildah from the Dockerfile, cached by its
# inputs; it prints where its result is) is run by tests/kernel/test_image_vm.py in the
# kernel suite's own boot.
IMAGE_DIR := build/image-dir
image-dir:
	@mkdir -p build
	tools/image >$(IMAGE_DIR).out
	@tail -n 1 $(IMAGE_DIR).out >$(IMAGE_DIR) && test -f "$$(cat $(IMAGE_DIR))/done"

test-kernel: $(STAMP) image-dir
	SVCPROXY_IMAGE="$$(cat $(IMAGE_DIR))" tools/vmtest $(VMTEST_ARGS)
	$(MAKE) --no-print-directory test-kernel-module

# svcproxy's own IPVS modules (kernel/; tools/build-ipvs-module builds them once and
# caches them), in two short boots of their own instead of the kernel's: mode=0, the
# same backend contract and sync tests as the stock module passes; mode=2, the
# share-namespace mode end to end. MODULE_TESTS run in both.
MODULE_TESTS       := tests/kernel/test_built_ipvs.py tests/kernel/test_kernel_module.py \
                      tests/kernel/test_mode_detection.py
KERNEL_MODE_TESTS  ?= $(MODULE_TESTS) tests/kernel/test_kernel_mode.py
KERNEL_MODE0_TESTS ?= $(MODULE_TESTS) tests/kernel/test_ipvsadm_backend.py \
                      tests/kernel/test_netlink_backend.py tests/kernel/test_sync.py
test-kernel-module: $(STAMP)
	@dir=$$(tools/build-ipvs-module | tail -n 1) && test -r "$$dir/ip_vs.ko" && \
	  VMTEST_IPVS_MODULES="$$dir" VMTEST_IPVS_MODE=0 tools/vmtest $(KERNEL_MODE0_TESTS) && \
	  VMTEST_IPVS_MODULES="$$dir" VMTEST_IPVS_MODE=2 tools/vmtest $(KERNEL_MODE_TESTS)

# tools/image builds the agent's image (cached by its inputs) and unpacks it; test-kernel
# runs it in the VM (alone: SVCPROXY_IMAGE=$(tools/image) tools/vmtest tests/kernel/test_image_vm.py).
image:
	tools/image

bench: $(STAMP)
	$(PY) bench/core.py
	$(PY) bench/agent.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .hypothesis

# --- the CNI plugin: a static executable, so that nodes need nothing to run it ---------
# musl-gcc (Debian's musl-tools) links statically by design and has no NSS to pull in;
# jsmn (libjsmn-dev) is the header-only JSON tokenizer it uses. Both are installed
# here when missing (as root), like every other dependency of `make test`.
CNI_CC     ?= musl-gcc
CNI_CFLAGS ?= -std=c11 -O2 -Wall -Wextra -Werror -Wshadow -Wformat=2 -Wconversion -Wno-sign-conversion \
              -fstack-protector-strong
CNI_PLUGIN := build/svcproxy-cni

.PHONY: cni-plugin cni-deps
cni-plugin: $(CNI_PLUGIN)

cni-deps:
	@command -v $(CNI_CC) >/dev/null && [ -f /usr/include/jsmn.h ] || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends musl-tools libjsmn-dev >/dev/null)

# musl-gcc sees only musl's headers: jsmn.h is offered from a directory of its own.
$(CNI_PLUGIN): cni/svcproxy-cni.c | cni-deps
	@mkdir -p build/include
	@ln -sf /usr/include/jsmn.h build/include/jsmn.h
	$(CNI_CC) $(CNI_CFLAGS) -Ibuild/include -static -s -o $@.tmp $<
	@mv $@.tmp $@
