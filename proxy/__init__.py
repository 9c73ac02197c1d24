"""The OpenAI-compatible key-pool proxy (``cst proxy``, and part of ``cst serve``).

Modules, one idea each:

* ``pool``      the keys and their health policy (pure, fake-clock testable)
* ``accounts``  where keys come from (DaiDai platform, static) and the manager that
                keeps the running sources equal to desired.yaml's ``accounts:``
* ``upstream``  a lean keep-alive HTTP/1.1 client for the forwarded requests
* ``forward``   one request: choose a key, retry before the first byte, relay
* ``callers``   who is calling: the instance a proxy key belongs to, a client key, anonymous
* ``usage``     per-caller requests, errors and tokens (from the answers' ``usage``)
* ``state``     what the parts share while the proxy runs (ProxyState)
* ``server``    the HTTP front: /v1/*, /health, /status, /metrics
* ``metrics``   Prometheus collector read at scrape time
* ``service``   ProxyService: start / apply(desired) / stop
* ``cli``       ``cst proxy -f desired.yaml``: the service alone, following the file
"""
