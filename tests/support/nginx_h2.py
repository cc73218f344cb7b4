"""nginx (Debian's nginx-light) serving h2c on a loopback port, for the HTTP/2 tests: `/` answers
200, `/missing` 404, `/boom` 503, other paths are files under DIR/www. Optionally the same
locations on a plain HTTP/1.1 port and on an HTTPS port offering h2 by ALPN."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.agent import stop_process, wait_port

CONF = """\
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{servers}}}
"""

# nginx 1.22 (Debian 12) has no `http2 on;`: the listen parameter decides, and a plain listener
# with `http2` speaks h2c with prior knowledge only (an HTTP/1.1 request there gets a GOAWAY).
SERVER = """\
    server {{
        listen 127.0.0.1:{port}{params};
{tls}        root {d}/www;
        location = / {{ return 200 "hello h2\\n"; }}
        location = /missing {{ return 404; }}
        location = /boom {{ return 503; }}
    }}
"""


def write_conf(d: Path, port: int, plain_port: int | None = None, tls_port: int | None = None,
               cert: Path | None = None, key: Path | None = None) -> Path:
    """The configuration in d (with its www directory), to run as `nginx -p d -c conf`: h2c on
    port; HTTP/1.1 on plain_port; HTTPS with ALPN h2 (cert and key) on tls_port."""
    (d / "www").mkdir(exist_ok=True)
    servers = SERVER.format(d=d, port=port, params=" http2", tls="")
    if plain_port is not None:
        servers += SERVER.format(d=d, port=plain_port, params="", tls="")
    if tls_port is not None:
        if cert is None or key is None:
            raise ValueError("an HTTPS port needs cert and key")
        tls = f"        ssl_certificate {cert};\n        ssl_certificate_key {key};\n"
        servers += SERVER.format(d=d, port=tls_port, params=" ssl http2", tls=tls)
    conf = d / "nginx.conf"
    conf.write_text(CONF.format(d=d, servers=servers))
    return conf


@contextlib.contextmanager
def running(d: Path, conf: Path, ports: list[int]) -> Iterator[subprocess.Popen[bytes]]:
    """nginx on conf (prefix d) until the block ends, once every one of ports accepts connections."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for port in ports:
            try:
                wait_port(port)
            except AssertionError:
                log = (d / "error.log").read_text(errors="replace") if (d / "error.log").exists() else ""
                raise AssertionError(f"nginx did not listen on {port}: {log}") from None
        yield proc
    finally:
        stop_process(proc)  # with master_process on, SIGTERM to the master stops its workers too
