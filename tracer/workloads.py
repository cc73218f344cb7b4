"""Which Kubernetes pods kspan traces, and what names them: a pure policy, pod metadata in.

The rules, in order (tracer/kubernetes.py applies them per pod; the kernel enforces the verdict
by cgroup id, bpf/http_exchange.h `cgroup_verdict`):
1. The namespace must match an include glob and no exclude glob. The namespace lists are the
   operator's boundary: a pod cannot opt itself into an excluded namespace.
2. Inside that boundary the pod's own choice wins: label or annotation `kspan.io/trace`, "true"
   or "false" (also on/off, yes/no, 1/0; the annotation wins when both are set).
3. Otherwise the pod is traced, unless opt-in mode is on (then only pods that said "true").
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TRACE_KEY = "kspan.io/trace"
DEFAULT_EXCLUDED = ("kube-system",)
_TRUE = frozenset(("true", "on", "yes", "1", "enabled"))
_FALSE = frozenset(("false", "off", "no", "0", "disabled"))


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in _TRUE


def _globs(value: str | None) -> tuple[str, ...] | None:
    """A comma-separated environment list; None when unset or blank (the default applies)."""
    if value is None or not value.strip():
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


def own_namespace(env: Mapping[str, str]) -> str | None:
    """kspan's own namespace, from the downward API (the DaemonSet sets POD_NAMESPACE)."""
    return env.get("KSPAN_NAMESPACE") or env.get("POD_NAMESPACE") or None


def trace_choice(labels: Mapping[str, str], annotations: Mapping[str, str]) -> tuple[bool | None, bool]:
    """The pod's own `kspan.io/trace` choice (None: it made none) and whether what it wrote was
    readable (False: a value that is neither yes nor no, treated as no choice and counted)."""
    for source in (annotations, labels):
        raw = source.get(TRACE_KEY)
        if raw is None:
            continue
        value = str(raw).strip().lower()
        if value in _TRUE:
            return True, True
        if value in _FALSE:
            return False, True
        return None, False
    return None, True


@dataclass(frozen=True, slots=True)
class WorkloadSelection:
    include_namespaces: tuple[str, ...] = ("*",)
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED
    opt_in: bool = False  # only pods labelled or annotated kspan.io/trace: "true"
    service_name_label: str | None = None  # this pod label names the service, before the defaults

    @classmethod
    def from_settings(
        cls,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        opt_in: bool | None = None,
        service_name_label: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> WorkloadSelection:
        """Command-line values win over the environment (KSPAN_INCLUDE_NAMESPACES,
        KSPAN_EXCLUDE_NAMESPACES, comma-separated; KSPAN_TRACE_OPT_IN; KSPAN_SERVICE_NAME_LABEL).
        An exclude list given either way replaces the default one (kube-system and kspan's own
        namespace)."""
        env = os.environ if env is None else env
        inc = tuple(include) if include else _globs(env.get("KSPAN_INCLUDE_NAMESPACES"))
        exc = tuple(exclude) if exclude else _globs(env.get("KSPAN_EXCLUDE_NAMESPACES"))
        if exc is None:
            own = own_namespace(env)
            exc = DEFAULT_EXCLUDED + ((own,) if own and own not in DEFAULT_EXCLUDED else ())
        label = service_name_label or env.get("KSPAN_SERVICE_NAME_LABEL") or None
        return cls(
            include_namespaces=inc or ("*",),
            exclude_namespaces=exc,
            opt_in=bool(opt_in) or _flag(env.get("KSPAN_TRACE_OPT_IN")),
            service_name_label=label.strip() if label else None,
        )

    @property
    def default_trace(self) -> bool:
        """The verdict of a process in no known pod (host processes, a pod not listed yet)."""
        return not self.opt_in

    def namespace_selected(self, namespace: str) -> bool:
        if not any(fnmatch.fnmatchcase(namespace, g) for g in self.include_namespaces):
            return False
        return not any(fnmatch.fnmatchcase(namespace, g) for g in self.exclude_namespaces)

    def pod_traced(self, namespace: str, labels: Mapping[str, str], annotations: Mapping[str, str]) -> bool:
        if not self.namespace_selected(namespace):
            return False
        choice, _ = trace_choice(labels, annotations)
        if choice is not None:
            return choice
        return not self.opt_in

    def describe(self) -> str:
        mode = "opted-in pods only" if self.opt_in else "every pod"
        text = (f"{mode} in namespaces {','.join(self.include_namespaces)}"
                f" except {','.join(self.exclude_namespaces) or 'none'}")
        if self.service_name_label:
            text += f"; service.name from label {self.service_name_label}"
        return text
