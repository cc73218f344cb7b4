#!/usr/bin/env bash
# Compile bpf/*.bpf.c into CO-RE objects under tracer/objects/ (shipped as package data).
# Runs at set-up/build time only: the agent never runs a compiler. vmlinux.h is generated from
# the build machine's BTF; the objects are relocated against the running kernel's BTF at load.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=tracer/objects
GEN=build/bpf
mkdir -p "$OUT" "$GEN"
BTF=${KSPAN_BUILD_BTF:-/sys/kernel/btf/vmlinux}
if [ ! -s "$GEN/vmlinux.h" ]; then
  bpftool btf dump file "$BTF" format c > "$GEN/vmlinux.h.tmp"
  mv "$GEN/vmlinux.h.tmp" "$GEN/vmlinux.h"
fi
case "$(uname -m)" in
  x86_64) ARCH=x86 ;;
  aarch64) ARCH=arm64 ;;
  *) ARCH=$(uname -m) ;;
esac
CLANG=${CLANG:-clang}
shopt -s nullglob
for src in bpf/*.bpf.c; do
  obj="$OUT/$(basename "${src%.c}").o"
  # Rebuild when the source or any shared header is newer than the object.
  if [ -f "$obj" ] && [ "$obj" -nt "$src" ] && [ -z "$(find bpf -name '*.h' -newer "$obj" -print -quit)" ]; then
    continue
  fi
  "$CLANG" -g -O2 -target bpf -D__TARGET_ARCH_$ARCH -Wall -Wno-unused-function \
    -I "$GEN" -I bpf -c "$src" -o "$obj.tmp"
  # DWARF is not needed at run time; .BTF and .BTF.ext (CO-RE relocations) stay.
  llvm-strip -g "$obj.tmp"
  mv "$obj.tmp" "$obj"
  echo "build-bpf: $obj" >&2
done
