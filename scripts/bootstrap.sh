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

# Debian packages: bcc for Debian's python3, the test peers, and the load generator.
PKGS=(python3-bpfcc bpfcc-tools python3-venv python3-dev make curl openssl nginx-light wrk iproute2 procps)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Kernel headers: bcc compiles its programs against /lib/modules/$(uname -r)/build. Prefer the
# running kernel's own package; else link the closest Debian linux-headers package (what Pixie
# does too). Our programs read no kernel struct by header offset on the tracepoint backend, so a
# near version is safe there.
KREL=$(uname -r)
MOD=/lib/modules/$KREL
if [ ! -e "$MOD/build/include" ]; then
  if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
    say "installing linux-headers-$KREL"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$KREL" >/dev/null
  else
    [ -n "$(apt-cache search --names-only '^linux-headers-[0-9.]+-[0-9]+-amd64$' 2>/dev/null)" ] || apt-get update -qq
    arch=$(dpkg --print-architecture)
    want=$(echo "$KREL" | grep -oE '^[0-9]+\.[0-9]+')
    # Closest: the newest Debian headers package; with several series, the one nearest the kernel.
    best=$(apt-cache search --names-only "^linux-headers-[0-9.]+-[0-9]+-${arch}\$" | awk '{print $1}' |
      sed "s/^linux-headers-//; s/-${arch}\$//" | sort -V |
      awk -v want="$want" 'BEGIN{split(want,w,".")} {split($1,v,"."); d=(w[1]-v[1])*1000+(w[2]-v[2]); if(d<0)d=-d; print d, $1}' |
      sort -k1,1n -k2,2Vr | head -1 | awk '{print $2}')
    if [ -z "$best" ]; then
      say "no kernel headers package found for $KREL; bcc cannot compile. Install headers for your kernel."
      exit 1
    fi
    say "WARNING: no headers package for kernel $KREL; using the closest Debian one, linux-headers-$best-$arch"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$best-$arch" >/dev/null
    mkdir -p "$MOD"
    ln -sfn "/usr/src/linux-headers-$best-$arch" "$MOD/build"
    ln -sfn "/usr/src/linux-headers-$best-common" "$MOD/source"
  fi
fi

# tracefs: bcc reads tracepoint formats from it; a fresh machine does not mount it.
if ! mountpoint -q /sys/kernel/tracing; then
  say "mounting tracefs on /sys/kernel/tracing"
  mount -t tracefs nodev /sys/kernel/tracing
fi
if [ -d /sys/kernel/debug ] && ! mountpoint -q /sys/kernel/debug; then
  mount -t debugfs nodev /sys/kernel/debug 2>/dev/null || true
fi

# The venv must be Debian's python3 with system site-packages: that is where bcc lives.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  say "creating .venv (Debian python3, with system site-packages for bcc)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.kspan-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing kspan and its dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
