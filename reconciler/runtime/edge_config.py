"""nginx's configuration for the edge, as a pure function of the routes (``render``).

Each route is one instance: its host names (TLS, at ``settings.edge.listen``) and its own port
(plain HTTP, the seed's way), both sent to its socket. For every request nginx

* compares the ``Authorization`` header with the instance's ``Basic`` credentials (one ``map``:
  no Python, no file read per request). A request without them never reaches node: it goes to an
  internal location where the failure limiter counts it (``limit_req`` keyed by the client's
  address *and* the instance, so a guesser on one instance locks out no one else, and the right
  password from that address is never refused), then gets nginx's own 401;
* sends it to node's socket; when nobody listens there (the instance is parked, or starting
  after a crash), nginx's 502 goes on to cst serve's gate, which wakes it and answers; when the
  gate is away too (cst serve restarting), a 503 with ``Retry-After``, never a refused connection;
* logs its end to cst serve's use socket (a datagram, dropped when nobody listens), which is
  how parking hears of short requests; long ones are seen in flight (``edge.in_flight``).

Domain cookies from node are narrowed to the host that asked (a page on one subdomain cannot
set cookies for its siblings that way). Addresses in ``X-Forwarded-For`` count only from the
declared trusted proxies (``realip``).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from ..desired.model import IPNetwork, Listen

# failed credentials per client address and instance: a burst of 10, then 6 a minute
FAILURE_RATE = "6r/m"
FAILURE_BURST = 10
HEADER_TIMEOUT = "10s"     # a connection that has not sent its request headers by then is closed
BODY_TIMEOUT = "60s"       # between two reads of a request body
IDLE_TIMEOUT = "75s"       # a kept-alive connection without a request
GATE_RETRY_AFTER = 5       # seconds, when cst serve's gate is away
WORKER_CONNECTIONS = 16384
MAX_BODY = "1g"            # SillyTavern takes uploads of chats, cards and backgrounds


@dataclass(frozen=True)
class Route:
    """One instance behind the edge."""

    id: str
    names: tuple[str, ...]       # host names at the TLS listener (none without settings.edge)
    port: Listen | None          # its own port, through the edge; None: host names only
    login: str                   # "<id>:<password>", what basic auth must carry. Never log it.
    socket: Path                 # where node answers

    @property
    def authorization(self) -> str:
        return "Basic " + base64.b64encode(self.login.encode()).decode()


@dataclass(frozen=True)
class Layout:
    """Where the edge's files are, and who its workers run as."""

    temp: Path                   # nginx's temporary files (its workers')
    gate: Path                   # cst serve's gate (a Unix socket)
    use: Path                    # cst serve's use socket (Unix datagrams)
    nobody: Path                 # an empty user file: every credential nginx checks against it fails
    worker_user: str | None      # None: nginx runs as CST's own user


@dataclass(frozen=True)
class Entrance:
    """``settings.edge``, as the configuration needs it."""

    listen: Listen
    cert: Path
    key: Path
    redirect_http: Listen | None


def render(routes: list[Route], layout: Layout, entrance: Entrance | None,
           trusted: tuple[IPNetwork, ...], max_files: int) -> str:
    """``max_files``: the open files a worker may have (a relayed connection takes two)."""
    lines = [
        "# written by cst (reconciler/runtime/edge_config.py): edits are replaced. Holds the instances'",
        "# credentials: root's alone.",
        *([f"user {layout.worker_user} {layout.worker_user};"] if layout.worker_user else []),
        "worker_processes auto;",
        f"worker_rlimit_nofile {max_files};",
        "pid nginx.pid;",
        "error_log error.log emerg;",   # what makes it refuse a configuration; not every parked request
        f"events {{ worker_connections {min(WORKER_CONNECTIONS, max_files // 2)}; }}",
        "http {",
        "  server_tokens off;",
        "  access_log off;",
        "  default_type application/octet-stream;",
        f"  client_body_temp_path {layout.temp / 'body'};",
        f"  proxy_temp_path {layout.temp / 'proxy'};",
        f"  fastcgi_temp_path {layout.temp / 'fastcgi'};",
        f"  uwsgi_temp_path {layout.temp / 'uwsgi'};",
        f"  scgi_temp_path {layout.temp / 'scgi'};",
        f"  client_header_timeout {HEADER_TIMEOUT};",
        f"  client_body_timeout {BODY_TIMEOUT};",
        f"  keepalive_timeout {IDLE_TIMEOUT};",
        "  send_timeout 60s;",
        f"  client_max_body_size {MAX_BODY};",
        "  proxy_http_version 1.1;",
        "  proxy_request_buffering off;",   # uploads and chat streams pass as they come
        "  proxy_buffering off;",
        "  proxy_connect_timeout 5s;",
        "  proxy_read_timeout 1h;",
        "  proxy_send_timeout 1h;",
        "  proxy_set_header Host $http_host;",
        "  proxy_set_header Connection \"\";",
        "  proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "  proxy_set_header X-Forwarded-Proto $scheme;",
        "  proxy_set_header X-CST-Instance \"\";",
        "  proxy_cookie_domain ~^.+$ $host;",
        "  recursive_error_pages on;",   # node away, then the gate away: the 503 of @cst_away
        "  log_format cst_use '$cst_id';",
        "  limit_req_status 429;",
        f"  limit_req_zone $cst_failure zone=cst_failures:10m rate={FAILURE_RATE};",
    ]
    if trusted:
        lines += [f"  set_real_ip_from {network};" for network in trusted]
        lines += ["  real_ip_header X-Forwarded-For;", "  real_ip_recursive on;"]
    longest = max((len(route.id) + 1 + len(route.authorization) for route in routes), default=0)
    lines += [f"  map_hash_bucket_size {_power_of_two(longest + 32)};", "  map_hash_max_size 262144;",
              '  map "$cst_id $http_authorization" $cst_authorized {', "    default 0;"]
    lines += [f'    "{route.id} {route.authorization}" 1;' for route in routes]
    lines += ["  }",
              '  map $cst_authorized $cst_failure { 1 ""; default "$binary_remote_addr$cst_id"; }']
    if entrance is not None:
        lines += [
            f"  ssl_certificate {entrance.cert};",
            f"  ssl_certificate_key {entrance.key};",
            "  ssl_protocols TLSv1.2 TLSv1.3;",
            "  ssl_session_cache shared:cst_tls:10m;",
            "  ssl_session_timeout 1h;",
            # a name nobody declared reaches no instance: no certificate, no answer
            "  server {",
            f"    listen {entrance.listen} ssl http2 default_server;",
            "    ssl_reject_handshake on;",
            "  }",
        ]
        if entrance.redirect_http is not None:
            names = " ".join(name for route in routes for name in route.names)
            lines += [
                "  server {",
                f"    listen {entrance.redirect_http} default_server;",
                "    return 404;",
                "  }",
                "  server {",
                f"    listen {entrance.redirect_http};",
                f"    server_name {names or '_'};",
                f"    return 308 https://$host{_port_suffix(entrance.listen)}$request_uri;",
                "  }",
            ]
    for route in routes:
        lines += _server(route, layout, entrance)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _power_of_two(at_least: int) -> int:
    size = 128
    while size < at_least:
        size *= 2
    return size


def _port_suffix(listen: Listen) -> str:
    return "" if listen.port == 443 else f":{listen.port}"


def _server(route: Route, layout: Layout, entrance: Entrance | None) -> list[str]:
    listens = [f"    listen {route.port};"] if route.port is not None else []
    if entrance is not None and route.names:
        listens.append(f"    listen {entrance.listen} ssl http2;")
    if not listens:
        return []
    return [
        "  server {",
        *listens,
        *([f"    server_name {' '.join(route.names)};"] if route.names else []),
        f"    set $cst_id {route.id};",
        "    location / {",
        "      if ($cst_authorized = 0) { rewrite ^ /.cst/denied last; }",
        f"      proxy_pass http://unix:{route.socket}:;",
        "      error_page 502 = @cst_gate;",
        f"      access_log syslog:server=unix:{layout.use},nohostname cst_use;",
        "    }",
        "    location = /.cst/denied {",
        "      internal;",
        f"      limit_req zone=cst_failures burst={FAILURE_BURST} nodelay;",
        '      auth_basic "SillyTavern";',
        f"      auth_basic_user_file {layout.nobody};",
        "    }",
        "    location @cst_gate {",
        f"      proxy_pass http://unix:{layout.gate}:;",
        "      proxy_set_header X-CST-Instance $cst_id;",
        "      error_page 502 504 = @cst_away;",
        f"      access_log syslog:server=unix:{layout.use},nohostname cst_use;",
        "    }",
        "    location @cst_away {",
        f"      add_header Retry-After {GATE_RETRY_AFTER} always;",
        "      default_type text/plain;",
        f'      return 503 "{route.id} cannot be woken right now; try again in a few seconds.\\n'
        f'{route.id} 暂时无法唤醒，请几秒后重试。\\n";',
        "    }",
        "  }",
    ]
