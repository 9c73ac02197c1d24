"""The edge's nginx configuration, as a pure function of the routes; and the gate's credential check
(tests/server/test_edge.py: nginx -t on a rendered configuration)."""
from __future__ import annotations

import base64
import ipaddress
import re
from pathlib import Path

from reconciler.desired.model import Listen
from reconciler.runtime.edge_config import FAILURE_BURST, Entrance, Layout, Route, render
from reconciler.server.gate import credentials_match

LAYOUT = Layout(Path("/run/cst/x/tmp"), Path("/run/cst/x/gate.sock"), Path("/run/cst/x/use.sock"),
                Path("/run/cst/x/nobody"), None)


def route(port: int, password: str = "pw", names: tuple[str, ...] = (), own_port: bool = True) -> Route:
    id_ = f"st-instance-{port}"
    return Route(id_, names, Listen("127.0.0.1", port) if own_port else None, f"{id_}:{password}",
                 Path(f"/run/cst/x/sockets/{id_}.sock"))


def test_credentials_are_compared_as_the_header_carries_them_utf8_included():
    config = render([route(8001, "pässwörd"), route(8002)], LAYOUT, None, (), 20000)
    expected = base64.b64encode("st-instance-8001:pässwörd".encode()).decode()
    assert f'"st-instance-8001 Basic {expected}" 1;' in config
    assert credentials_match(f"Basic {expected}", "st-instance-8001:pässwörd")
    assert credentials_match(f"basic {expected}", "st-instance-8001:pässwörd")
    assert not credentials_match(f"Basic {expected}", "st-instance-8001:passwort")
    assert not credentials_match("Basic !!!", "st-instance-8001:pässwörd")
    assert not credentials_match(f"Bearer {expected}", "st-instance-8001:pässwörd")


def test_each_instance_gets_its_port_names_socket_limit_and_gate():
    config = render([route(8001, names=("st-instance-8001.st.test", "alice.st.test")), route(8002, own_port=False)],
                    LAYOUT, Entrance(Listen("0.0.0.0", 443), Path("/c.pem"), Path("/k.pem"), None), (), 20000)
    assert "listen 127.0.0.1:8001;" in config and "listen 127.0.0.1:8002;" not in config
    assert "server_name st-instance-8001.st.test alice.st.test;" in config
    assert "proxy_pass http://unix:/run/cst/x/sockets/st-instance-8001.sock:;" in config
    # an instance with neither a port nor a name at the edge has no server at all
    assert "set $cst_id st-instance-8002;" not in config
    assert f"limit_req zone=cst_failures burst={FAILURE_BURST} nodelay;" in config
    assert '"$binary_remote_addr$cst_id"' in config     # per address and instance
    assert "ssl_reject_handshake on;" in config and "ssl_certificate /c.pem;" in config
    assert "real_ip_header" not in config               # nobody's X-Forwarded-For is believed


def test_trusted_proxies_and_the_http_redirect():
    config = render([route(8001, names=("st-instance-8001.st.test",))], LAYOUT,
                    Entrance(Listen("0.0.0.0", 8443), Path("/c.pem"), Path("/k.pem"), Listen("0.0.0.0", 80)),
                    (ipaddress.ip_network("10.0.0.0/8"),), 20000)
    assert "set_real_ip_from 10.0.0.0/8;" in config and "real_ip_header X-Forwarded-For;" in config
    assert "return 308 https://$host:8443$request_uri;" in config
    assert re.search(r"worker_connections 10000;", config)
