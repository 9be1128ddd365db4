"""The route file: validation messages, defaults, durations, schema, `strangler check`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from strangler import config
from strangler.cli import main
from strangler.exceptions import ConfigError

ROOT = Path(__file__).resolve().parent.parent

VALID = textwrap.dedent(
    """\
    server:
      port: 8080
      admin_port: 9090
    backends:
      legacy: {url: "http://127.0.0.1:8081", timeouts: {connect: 500ms, read: 2s}}
      orders: {url: "http://127.0.0.1:8082/base/"}
    routes:
      - name: orders
        match: {path_prefix: /api/orders, methods: [get, POST]}
        backends:
          - {name: legacy, weight: 90}
          - {name: orders, weight: 10}
        sticky: {header: X-User-Id}
        fallback: legacy
        rewrite: {replace_prefix: {from: /api, to: /v2}}
      - name: monolith
        match: {path_prefix: /}
        backends: [{name: legacy, weight: 100}]
    """
)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.loads(text, "routes.yaml")
    return info.value.messages


def test_valid_file_loads_with_defaults_and_durations() -> None:
    cfg = config.loads(VALID, "routes.yaml")
    assert [r.name for r in cfg.routes] == ["orders", "monolith"]
    assert cfg.backend_timeouts("legacy").connect == 0.5
    assert cfg.backend_timeouts("legacy").read == 2.0
    assert cfg.backend_timeouts("orders") == cfg.defaults.timeouts
    assert cfg.backends["orders"].url == "http://127.0.0.1:8082/base"
    assert cfg.routes[0].match.methods == ["GET", "POST"]
    assert cfg.routes[0].rewrite is not None
    assert cfg.routes[0].rewrite.replace_prefix is not None
    assert cfg.routes[0].rewrite.replace_prefix.to == "/v2"
    assert cfg.server.limits.max_body_bytes == 10 * 1024 * 1024


def test_demo_route_file_is_valid() -> None:
    cfg = config.load(ROOT / "routes" / "demo.yaml")
    assert cfg.routes[-1].match.path_prefix == "/"


def test_weights_summing_to_zero_name_file_route_field_and_line() -> None:
    text = VALID.replace("weight: 90", "weight: 0").replace("weight: 10}", "weight: 0}")
    assert errors_of(text) == ["routes.yaml:10: route 'orders': backends: weights sum to 0"]


def test_unknown_backend_is_reported_with_its_line() -> None:
    text = VALID.replace("{name: orders, weight: 10}", "{name: ordres, weight: 10}")
    (msg,) = errors_of(text)
    assert msg.startswith(
        "routes.yaml:12: route 'orders': backends.1.name: unknown backend 'ordres'"
    )


def test_bad_regex_is_reported() -> None:
    text = VALID.replace("match: {path_prefix: /}", 'match: {regex: "^/(a"}')
    (msg,) = errors_of(text)
    assert msg.startswith("routes.yaml:17: route 'monolith': match.regex: bad regex '^/(a'")


def test_duplicate_route_names_are_reported() -> None:
    text = VALID.replace("name: monolith", "name: orders")
    (msg,) = errors_of(text)
    assert (
        msg == "routes.yaml:16: route 'orders': name: duplicate route name (first used by route #1)"
    )


def test_every_error_is_reported_in_one_run() -> None:
    """A field error in one route must not hide cross-reference errors elsewhere."""
    text = (
        VALID.replace("weight: 90", "weight: -1")  # field error
        .replace("fallback: legacy", "fallback: nope")  # cross-reference
        .replace("name: monolith", "name: orders")  # duplicate
        .replace('url: "http://127.0.0.1:8082/base/"', 'url: "ftp://x"')
    )
    messages = errors_of(text)
    assert len(messages) == 4, messages
    assert any("backends.0.weight" in m for m in messages)
    assert any("fallback: unknown backend 'nope'" in m for m in messages)
    assert any("duplicate route name" in m for m in messages)
    assert any("backend 'orders': url:" in m for m in messages)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("match: {path_prefix: /}", "match: {path_prefix: /, path: /x}", "exactly one of"),
        ("match: {path_prefix: /}", "match: {path_prefix: api}", "must start with '/'"),
        ("sticky: {header: X-User-Id}", "sticky: {header: X, cookie: s}", "exactly one of"),
        ("connect: 500ms", "connect: soon", "invalid duration"),
        ("port: 8080", "port: 70000", "less than or equal to 65535"),
        ("port: 8080", "port: 9090", "must differ from port"),
        ("fallback: legacy", "fallbak: legacy", "unknown field"),
        ("methods: [get, POST]", "methods: [GET, 'BAD METHOD']", "invalid method"),
    ],
)
def test_field_errors_are_named(old: str, new: str, expected: str) -> None:
    messages = errors_of(VALID.replace(old, new))
    assert any(expected in m for m in messages), messages
    assert all(m.startswith("routes.yaml:") for m in messages)


def test_invalid_yaml_gives_the_line() -> None:
    (msg,) = errors_of("backends:\n  legacy: {url: [\n")
    assert msg.startswith("routes.yaml:3: invalid YAML")


def test_missing_sections_are_reported() -> None:
    messages = errors_of("server: {port: 8080}\n")
    assert any("backends" in m for m in messages)
    assert any("routes" in m for m in messages)


def test_check_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    assert main(["check", str(good)]) == 0
    assert "ok (2 routes, 2 backends)" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("{name: orders, weight: 10}", "{name: nope, weight: 10}"))
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:12: route 'orders': backends.1.name: unknown backend 'nope'" in err

    assert main(["check", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read route file" in capsys.readouterr().err


def test_schema_command_prints_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "strangler route file"
    assert {"server", "backends", "routes"} <= set(schema["properties"])
    assert "Route" in schema["$defs"]
