"""Stand-in backends for developing and testing the strangler gateway.

A strangler-fig migration has two sides: the legacy monolith that still owns
most routes, and the new services that take them over one by one. These stubs
play both sides with deterministic data, so the gateway can be exercised end
to end (routing, sticky sessions, shadow comparison, retries, streaming,
header hygiene) without the real systems.

Commands::

    python -m legacy_stub monolith --port 8081 [--host 127.0.0.1]
    python -m legacy_stub orders --port 8082 [--host 127.0.0.1] [--differences FIELD,FIELD]

Common options: ``--fault PREFIX:latency_ms=200,error_rate=0.5`` (repeatable),
``--access-log``, ``--log-level``, ``--shutdown-timeout``. ``--port 0`` picks a
free port. Each logs one line with its URL on start and exits with status 0
on SIGTERM or SIGINT.

Monolith (a small shop; shop JSON carries noise fields ``generated_at`` and
``trace_id``)::

    GET  /                      HTML home page
    GET  /healthz               {"status": "ok"}
    GET  /api/items             ?limit=&offset=&category=
    GET  /api/items/{id}
    GET  /api/users/{id}
    POST /login                 form or JSON {"username", "password": "secret"};
                                sets cookies "session" (HttpOnly) and "csrftoken"
    POST /logout
    GET  /api/me                the logged-in user, or 401
    GET  /api/orders            ?user_id=&status=&limit=&offset=
    GET  /api/orders/{id}
    POST /api/orders            {"user_id", "items": [{"item_id", "qty"}]} -> 201
    DELETE /api/orders/{id}
    POST /api/upload            (or PUT) read streaming; {"bytes", "sha256"}
    GET  /api/download          ?size=N (default 1 MiB, max 4 GiB); see data.download_pattern
    GET  /api/reports/sales     answers after ~300 ms
    GET  /api/slow              ?ms=N (max 60000)

Orders service: ``/healthz`` and the orders routes above, same data and
shapes, plus ``GET``/``PUT /__stub/differences`` (see `legacy_stub.orders`).

Both apps also serve the test endpoints of `legacy_stub.common`
(``/__stub/echo[/...]``, ``/__stub/status/{code}``, ``/__stub/cookies``) and
the fault and stats control API of `legacy_stub.faults`. `legacy_stub.testing`
starts and stops stub processes for tests.
"""

from __future__ import annotations
