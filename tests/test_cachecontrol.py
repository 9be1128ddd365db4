"""RFC 9111 shared-cache rules (pure functions, no clock)."""

from __future__ import annotations

from typing import Any

import pytest

from strangler.cachecontrol import (
    MAX_DELTA,
    CacheControl,
    current_age,
    freshness_lifetime,
    http_date,
    may_serve_stale,
    needs_revalidation,
    storable,
    targeted,
)

DATE = "Mon, 23 Nov 2026 10:00:00 GMT"
_parsed = http_date(DATE)
assert _parsed is not None
T: float = _parsed


def cc(*values: str) -> CacheControl:
    return CacheControl.parse(values)


def test_directives_are_parsed_case_insensitively_across_lines_with_quotes() -> None:
    parsed = cc('Max-Age=60, no-cache="Set-Cookie, X-Foo"', "S-MAXAGE=120, public")
    assert parsed.seconds("max-age") == 60
    assert parsed.seconds("s-maxage") == 120
    assert parsed.directives["no-cache"] == "Set-Cookie, X-Foo"
    assert parsed.has("public")


@pytest.mark.parametrize(
    ("value", "expected"), [("max-age=abc", None), ("max-age=-1", None), ("max-age", None)]
)
def test_malformed_delta_seconds_are_ignored(value: str, expected: int | None) -> None:
    assert cc(value).seconds("max-age") == expected


def test_huge_delta_seconds_are_capped() -> None:
    assert cc("max-age=99999999999999").seconds("max-age") == MAX_DELTA


def test_first_occurrence_of_a_repeated_directive_wins() -> None:
    assert cc("max-age=10", "max-age=20").seconds("max-age") == 10


def fresh_for(value: str = "", **kw: Any) -> float:
    args: dict[str, Any] = {
        "date": T,
        "expires": None,
        "last_modified": None,
        "response_time": T,
        "heuristic": False,
    }
    args.update(kw)
    return freshness_lifetime(cc(value), **args)


def test_s_maxage_beats_max_age_beats_expires() -> None:
    expires = "Mon, 23 Nov 2026 10:05:00 GMT"
    assert fresh_for("max-age=60, s-maxage=120", expires=expires) == 120
    assert fresh_for("max-age=60", expires=expires) == 60
    assert fresh_for("", expires=expires) == 300


def test_invalid_expires_means_already_expired() -> None:
    assert fresh_for("", expires="0") == 0


FIXED = 2544400878.0  # Thu, 18 Aug 2050 02:01:18 GMT


@pytest.mark.parametrize(
    "value",
    [
        "Thu, 18 Aug 2050 02:01:18 GMT",  # IMF-fixdate
        "THU, 18 AUG 2050 02:01:18 gmt",  # names in any case
        "Thursday, 18-Aug-50 02:01:18 GMT",  # RFC 850, two-digit year
        "Thu Aug 18 02:01:18 2050",  # asctime
    ],
)
def test_the_three_http_date_forms_are_read(value: str) -> None:
    assert http_date(value) == FIXED


def test_an_rfc_850_year_more_than_50_years_ahead_is_in_the_past() -> None:
    assert http_date("Sunday, 06-Nov-94 08:49:37 GMT") == 784111777.0


@pytest.mark.parametrize(
    "value",
    [
        "Thu, 18 Aug 2050 02:01:18 UTC",
        "Thu, 18 Aug 2050 02:01:18 AEST",
        "Thu, 18 Aug 50 02:01:18 GMT",
        "Thu 18 Aug 2050 02:01:18 GMT",
        "Thu, 18  Aug  2050 02:01:18 GMT",
        "Thu, 18-Aug-2050 02:01:18 GMT",
        "Thu, 18 Aug 2050 02.01.18 GMT",
        "Thu, 18 Aug 2050 2:01:18 GMT",
        "Thu, 18 Aug 2050 25:01:18 GMT",
        "0",
        "",
    ],
)
def test_anything_else_is_not_a_date_so_such_an_expires_is_already_stale(value: str) -> None:
    assert http_date(value) is None
    assert fresh_for("", expires=value) == 0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7200, 0", 7200), ("0, 7200", 0), ("7200;foo=bar", 7200), ("-7200", 0), ("7200.0", 0)],
)
def test_the_first_age_value_counts_and_a_malformed_one_is_zero(value: str, seconds: int) -> None:
    assert current_age(age_header=value, date=None, request_time=T, response_time=T, now=T) == (
        seconds
    )


@pytest.mark.parametrize(
    ("value", "directives"),
    [
        ("max-age=600", {"max-age": "600"}),
        ("no-store", {"no-store": None}),
        ("foo, max-age=60;x=1", {"foo": None, "max-age": "60"}),
        ("max-age=99999999999", {"max-age": "99999999999"}),
    ],
)
def test_cdn_cache_control_is_read_as_a_structured_dictionary(
    value: str, directives: dict[str, str | None]
) -> None:
    parsed = targeted([value.encode()])
    assert parsed is not None
    assert dict(parsed.directives) == directives


@pytest.mark.parametrize(
    "value", ['max-age="600"', "max-age=600, &&&", "max-age =600", "Max-Age=600", "max-age=1,"]
)
def test_an_invalid_cdn_cache_control_is_ignored(value: str) -> None:
    assert targeted([value.encode()]) is None


def test_heuristic_freshness_only_when_enabled() -> None:
    last_modified = T - 1000
    assert fresh_for("", last_modified=last_modified) == 0
    assert fresh_for("", last_modified=last_modified, heuristic=True) == pytest.approx(100)


def test_age_follows_rfc_9111_section_4_2_3() -> None:
    # Stored with Age: 30, one second of network delay, read 60 s later.
    age = current_age(age_header="30", date=T, request_time=T - 1, response_time=T, now=T + 60)
    assert age == pytest.approx(91)
    # A Date in the past counts as apparent age.
    age = current_age(age_header=None, date=T - 50, request_time=T, response_time=T, now=T)
    assert age == pytest.approx(50)


def verdict(resp: str = "max-age=60", **kw: Any) -> tuple[bool, str]:
    args: dict[str, Any] = {
        "method": "GET",
        "status": 200,
        "request_cc": cc(),
        "response_cc": cc(resp),
        "has_authorization": False,
        "has_set_cookie": False,
        "vary": None,
        "expires": None,
        "heuristic": False,
    }
    args.update(kw)
    v = storable(**args)
    return v.store, v.reason


def test_plain_cacheable_response_is_stored() -> None:
    assert verdict() == (True, "")


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"resp": "no-store"}, "no-store"),
        ({"request_cc": CacheControl.parse(["no-store"])}, "no-store"),
        ({"resp": "private, max-age=60"}, "private"),
        ({"vary": "Accept, *"}, "vary-star"),
        ({"has_set_cookie": True}, "set-cookie"),
        ({"has_authorization": True}, "authorization"),
        ({"method": "POST"}, "method"),
        ({"status": 500}, "status"),
        ({"resp": ""}, "no-freshness"),
    ],
)
def test_responses_a_shared_cache_must_not_store(kw: dict[str, Any], reason: str) -> None:
    assert verdict(**kw) == (False, reason)


@pytest.mark.parametrize("resp", ["public", "s-maxage=60", "must-revalidate, max-age=60"])
def test_authorized_request_is_stored_when_the_response_allows_it(resp: str) -> None:
    assert verdict(resp, has_authorization=True)[0]


def test_set_cookie_is_stored_when_the_route_opts_in() -> None:
    assert verdict(has_set_cookie=True, allow_set_cookie=True)[0]


def test_heuristic_makes_a_response_without_freshness_storable() -> None:
    assert verdict("", heuristic=True)[0]
    assert not verdict("", heuristic=True, status=302)[0]


def test_revalidation_rules() -> None:
    assert needs_revalidation(cc("no-cache"), fresh=True)
    assert not needs_revalidation(cc("max-age=60"), fresh=True)
    assert needs_revalidation(cc("max-age=60"), fresh=False)
    assert may_serve_stale(cc("max-age=60"))
    for value in ("must-revalidate", "proxy-revalidate", "no-cache"):
        assert not may_serve_stale(cc(value))
