#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine for kspan (run as root). A second run changes nothing
# and takes a second or two: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'bootstrap: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "kspan loads eBPF programs and must be set up and run as root (try: sudo make $*)"
  exit 1
fi

# Debian packages. Run time: libbpf1 (the loader is ctypes over libbpf.so.1). Build time only:
# clang, llvm-strip and bpftool compile bpf/*.bpf.c into CO-RE objects once, here; the agent
# never runs a compiler and needs no kernel headers. The rest are the test peers and load tools
# (prometheus: the real server the scrape-endpoint test runs on its own port, and promtool, which
# checks and unit-tests deploy/prometheus/kspan-rules.yaml).
PKGS=(libbpf1 libbpf-dev clang llvm bpftool python3-venv python3-dev gcc make curl openssl nginx-light wrk iproute2
      procps util-linux nodejs prometheus redis-server)
# postgresql-15, mariadb-server: the real servers the PostgreSQL and MySQL decoders' tests start
# in a temporary directory (never the system service).
PKGS+=(postgresql-15 mariadb-server)
# kubernetes-client: Debian's kubectl, which the tests use to render deploy/kubernetes with
# `kubectl kustomize`. Where another package owns /usr/bin/kubectl (Google Cloud SDK's `kubectl`),
# the same Debian package is unpacked under .cache/kubernetes-client instead of overwriting it.
KUBECTL_DIR=.cache/kubernetes-client
kubectl_owner=$(dpkg -S /usr/bin/kubectl 2>/dev/null | cut -d: -f1 || true)
if [ -n "$kubectl_owner" ] && [ "$kubectl_owner" != kubernetes-client ]; then
  unpack_kubectl=1
else
  unpack_kubectl=0
  PKGS+=(kubernetes-client)
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "$unpack_kubectl" = 1 ] && [ ! -x "$KUBECTL_DIR/usr/bin/kubectl" ]; then
  say "unpacking Debian's kubernetes-client into $KUBECTL_DIR (/usr/bin/kubectl belongs to $kubectl_owner)"
  tmp=$(mktemp -d)
  (cd "$tmp" && { apt-get download -qq kubernetes-client 2>/dev/null || { apt-get update -qq && apt-get download -qq kubernetes-client; }; })
  mkdir -p "$KUBECTL_DIR"
  dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$KUBECTL_DIR"
  rm -rf "$tmp"
fi

# The probes: CO-RE objects compiled against a vmlinux.h made from this machine's BTF, relocated
# against the running kernel's BTF when loaded. Rebuilt only when a source changed.
bash scripts/build-bpf.sh

# tracefs: libbpf finds tracepoint ids there; a fresh machine does not mount it.
if ! mountpoint -q /sys/kernel/tracing; then
  say "mounting tracefs on /sys/kernel/tracing"
  mount -t tracefs nodev /sys/kernel/tracing
fi

# The venv is Debian's python3, isolated from system site-packages (kspan needs nothing from them).
if [ ! -x .venv/bin/python ] || ! grep -q '^include-system-site-packages = false' .venv/pyvenv.cfg 2>/dev/null; then
  say "creating .venv (Debian python3)"
  rm -rf .venv
  /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.kspan-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing kspan and its dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
# The compiled hot path (setup.py: tracer/_records.c, correlator/_spans.c, exporters/_wire.c,
# exporters/_metrics.c),
# built in place so the source tree imports it like the editable install does; rebuilt when a C
# source, setup.py or bpf/kspan.h (whose structs tracer/_records.c reads) is newer than its module.
for src in tracer/_records.c correlator/_spans.c exporters/_wire.c exporters/_metrics.c; do
  so=$(ls "${src%.c}".cpython-*.so 2>/dev/null | head -1 || true)
  if [ -z "$so" ] || [ "$src" -nt "$so" ] || [ setup.py -nt "$so" ] || [ bpf/kspan.h -nt "$so" ]; then
    say "compiling the hot path's C extensions (gcc)"
    .venv/bin/python setup.py -q build_ext --inplace >/dev/null 2>.venv/ext.log || { cat .venv/ext.log >&2; exit 1; }
    # setuptools leaves a module it found up to date untouched: mark them all as checked now, or
    # an older one would send every later run here again
    touch tracer/_records.cpython-*.so correlator/_spans.cpython-*.so exporters/_wire.cpython-*.so \
      exporters/_metrics.cpython-*.so
    break
  fi
done
