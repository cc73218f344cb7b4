"""Builds the benchmark's Go programs (stdlib only, offline) into .cache/bench/."""

from __future__ import annotations

import os
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
OUT = os.path.join(REPO, ".cache", "bench")
# The Go whose `Protocols` API the sink needs (cleartext HTTP/2 for OTLP/gRPC): Go >= 1.24.
GO_CANDIDATES = [os.path.join(REPO, ".cache", "go", v, "go", "bin", "go") for v in ("1.27", "1.25")]


def go_binary() -> str:
    env = os.environ.get("KSPAN_BENCH_GO")
    if env:
        return env
    for c in GO_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    found = shutil.which("go")
    if found:
        return found
    raise RuntimeError("no Go toolchain: run `make go` (installs Go under .cache/go) or set KSPAN_BENCH_GO")


def build(name: str) -> str:
    """Build bench/NAME/main.go to .cache/bench/NAME unless the binary is newer than the source."""
    src = os.path.join(BENCH, name, "main.go")
    out = os.path.join(OUT, name)
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
        return out
    os.makedirs(OUT, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("GOCACHE", os.path.join(REPO, ".cache", "gocache"))
    env.setdefault("GOPATH", os.path.join(REPO, ".cache", "gopath"))
    env["GOTOOLCHAIN"] = "local"
    env["GOFLAGS"] = ""
    env["CGO_ENABLED"] = "0"
    subprocess.run([go_binary(), "build", "-o", out, "main.go"], cwd=os.path.dirname(src), env=env,
                   check=True, timeout=300)
    return out
