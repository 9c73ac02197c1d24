# Two entry points for a fresh machine: `make run` and `make test`. Everything else is a step of those;
# `make check` is the fast tier of `make test` (README: Tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# one shared SillyTavern install for the example, the tests and the benchmarks
export CST_SILLYTAVERN_HOME ?= $(CURDIR)/.cache/sillytavern

.PHONY: run test check setup node page-check sandbox edge sillytavern browser servers images image-tools bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed node

node:
	@command -v node >/dev/null && command -v npm >/dev/null || \
	  { echo "Node.js >= 20 with npm is needed to run SillyTavern"; exit 1; }
	@node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' || \
	  { echo "Node.js >= 20 is needed (found $$(node --version))"; exit 1; }

# the admin page's JavaScript (reconciler/server/page/) is type-checked by TypeScript from its JSDoc
# types: tsc only checks, the page ships as it is written. TypeScript is pinned by the lock file in
# tools/page-check/ and installed there by npm ci, apart from everything else
PAGE_CHECK := tools/page-check
TSC := $(PAGE_CHECK)/node_modules/.bin/tsc
$(PAGE_CHECK)/node_modules/.installed: $(PAGE_CHECK)/package-lock.json | node
	cd $(PAGE_CHECK) && npm ci --no-audit --no-fund
	touch $@

page-check: $(PAGE_CHECK)/node_modules/.installed
	$(TSC) --noEmit -p $(PAGE_CHECK)/tsconfig.json

# as root each instance runs in a sandbox of bubblewrap's (Debian's bubblewrap; setpriv is util-linux's,
# always there), and `cst st install` builds each release's front end for it: installed first
SANDBOX_PACKAGES := bubblewrap
sandbox:
	@[ "$$(id -u)" != 0 ] || command -v bwrap >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "instances run in bubblewrap's sandbox as root: install bwrap"; exit 1; }; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $(SANDBOX_PACKAGES) || \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends $(SANDBOX_PACKAGES); }; }

# the edge in front of the instances is Debian's nginx (nginx-light)
EDGE_PACKAGES := nginx-light
edge:
	@test -x /usr/sbin/nginx || { \
	  command -v apt-get >/dev/null || { echo "the edge in front of the instances is nginx: install it"; exit 1; }; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q --no-install-recommends $(EDGE_PACKAGES) || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(EDGE_PACKAGES); }; }

sillytavern: setup sandbox edge
	$(BIN)/cst st install -f examples/desired.yaml
	$(BIN)/cst st install -f tests/releases.yaml

# the page tests drive Debian's chromium through Playwright (whose own browser download cannot
# reach its host here); installed from the distribution when it is missing, with a small CJK font
# so the Chinese screenshots show characters rather than boxes
CHROMIUM ?= /usr/bin/chromium
BROWSER_PACKAGES := chromium fonts-wqy-microhei
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x $(CHROMIUM) && fc-list :lang=zh 2>/dev/null | grep -q . || { \
	  command -v apt-get >/dev/null || { echo "the browser tests need Chromium at $(CHROMIUM)"; exit 1; }; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES); }; }

# the shared-store tests start a PostgreSQL cluster of their own from Debian's server binaries, and
# nginx in front of two proxy replicas with examples/nginx-replicas.conf
SERVER_PACKAGES := postgresql nginx-light
servers:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && test -x /usr/sbin/nginx || { \
	  command -v apt-get >/dev/null || { echo "the shared-store tests need PostgreSQL's server and nginx"; exit 1; }; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q --no-install-recommends $(SERVER_PACKAGES) || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(SERVER_PACKAGES); }; }

# the container images as OCI layouts (images/README.md): built from Debian's packages, the npm
# registry and PyPI with no container engine; the tests check them with Debian's skopeo and run them
# in bubblewrap (the sandbox target's)
images: sillytavern
	$(BIN)/python images/build.py -f examples/desired.yaml -o build/images

IMAGE_PACKAGES := skopeo
image-tools: sandbox
	@command -v skopeo >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "the image tests read the layouts with skopeo: install it"; exit 1; }; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q --no-install-recommends $(IMAGE_PACKAGES) || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(IMAGE_PACKAGES); }; }

run: sillytavern
	$(BIN)/cst serve -f examples/desired.yaml

# the tests type-checked with a lighter set than the product's [tool.mypy] in pyproject.toml: every
# function body checked, annotations optional, None not tracked; the project's modules they import
# are read, not reported (the first mypy reports them). tests/ and tests/proxy hold the helpers the
# tests import (conftest, fakes, proxy_fixtures), as pytest puts them on the path.
MYPY_TESTS := MYPYPATH=tests:tests/proxy $(BIN)/mypy --config-file= --python-version 3.11 --explicit-package-bases \
	--ignore-missing-imports --check-untyped-defs --no-strict-optional --follow-imports=silent \
	--warn-unused-ignores --warn-redundant-casts --cache-dir .mypy_cache/tests tests

# the fast tier: the linters, then tests/unit, which needs Python and the venv only (no node, SillyTavern,
# chromium, PostgreSQL, nginx, npm, bubblewrap or network); under a minute
check: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(MYPY_TESTS)
	$(BIN)/python -m pytest -q tests/unit

# everything: the fast tier first (it fails within a minute), the admin page's types (tsc's
# configuration is in tools/page-check/tsconfig.json), then every other test
test: check sillytavern browser servers image-tools $(PAGE_CHECK)/node_modules/.installed
	$(TSC) --noEmit -p $(PAGE_CHECK)/tsconfig.json
	$(BIN)/python -m pytest -q --ignore=tests/unit

bench: sillytavern servers
	$(BIN)/python bench/reconciler.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/proxy/bench.py
	$(BIN)/python bench/proxy/stores.py
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/snapshots.py --runs 5
	$(BIN)/python bench/disk_use.py --dir /var/tmp
	$(BIN)/python bench/density.py --runs 3 --wakes 20 --instances 100
	$(BIN)/python bench/edge.py --runs 5
	$(BIN)/python bench/page500.py --runs 5
	$(BIN)/python bench/sandbox.py --runs 10

clean:
	rm -rf $(VENV) .cache examples/.cst examples/user-data $(PAGE_CHECK)/node_modules
