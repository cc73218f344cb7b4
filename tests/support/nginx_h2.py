"""nginx (Debian's nginx-light) serving h2c on a loopback port, for the HTTP/2 tests: `/` answers
200, `/missing` 404, `/boom` 503, other paths are files under DIR/www."""

from __future__ import annotations

from pathlib import Path

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
    server {{
        listen 127.0.0.1:{port} http2;
        root {d}/www;
        location = / {{ return 200 "hello h2\\n"; }}
        location = /missing {{ return 404; }}
        location = /boom {{ return 503; }}
    }}
}}
"""


def write_conf(d: Path, port: int) -> Path:
    """The configuration in d (with its www directory), to run as `nginx -p d -c conf`."""
    (d / "www").mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(CONF.format(d=d, port=port))
    return conf
