"""The compiled part of kspan's per-record hot path (everything else is in pyproject.toml).

Each extension is the one implementation of its job, not an accelerator with a Python twin:
tracer/_records.c decodes the kernel's records, correlator/_spans.c assembles HTTP/1 spans from them,
correlator/_routes.c is the route heuristic and cap, correlator/_red.c turns metric records into
RedFacts, exporters/_wire.c writes OTLP span bytes, exporters/_metrics.c folds spans and unsampled
exchanges into the metrics aggregator's streams.
Built by Debian's gcc against python3-dev; scripts/bootstrap.sh rebuilds them in place when a
source is newer than its module.
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers", "-std=c11"]

setup(
    ext_modules=[
        # compiled against the kernel's record layouts themselves (tracer/records.py checks its ctypes
        # mirrors against the result at import)
        Extension("tracer._records", ["tracer/_records.c"], depends=["bpf/kspan.h"], extra_compile_args=_FLAGS),
        Extension("correlator._spans", ["correlator/_spans.c"], extra_compile_args=_FLAGS),
        Extension("correlator._routes", ["correlator/_routes.c"], extra_compile_args=_FLAGS),
        Extension("correlator._red", ["correlator/_red.c"], extra_compile_args=_FLAGS),
        Extension("exporters._wire", ["exporters/_wire.c"], extra_compile_args=_FLAGS),
        Extension("exporters._metrics", ["exporters/_metrics.c"], extra_compile_args=_FLAGS),
    ]
)
