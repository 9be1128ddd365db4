"""Shadow-traffic response comparison (pure functions, no I/O)."""

from __future__ import annotations

import json

import pytest

from strangler.diff import (
    MAX_FIELDS,
    Captured,
    DiffOptions,
    Templater,
    compare,
    redact,
    significant,
)

JSON = ((b"content-type", b"application/json"),)
TEXT = ((b"content-type", b"text/plain; charset=utf-8"),)


def js(
    value: object, *, status: int = 200, headers: tuple[tuple[bytes, bytes], ...] = JSON
) -> Captured:
    return Captured(status, headers, json.dumps(value).encode())


def diff_json(a: object, b: object, **options: object) -> dict[str, tuple[str, str]]:
    return compare(js(a), js(b), DiffOptions(**options))  # type: ignore[arg-type]


# --- status, headers, redaction ---------------------------------------------------------


def test_identical_responses_have_no_diffs() -> None:
    response = js({"a": [1, {"b": "c"}]}, headers=(*JSON, (b"x-v", b"1")))
    assert compare(response, response, DiffOptions()) == {}


def test_status_codes_differ() -> None:
    assert compare(js({}, status=200), js({}, status=503), DiffOptions()) == {
        "status": ("200", "503")
    }


def test_header_values_are_joined_in_order_and_missing_is_named() -> None:
    p = Captured(200, ((b"vary", b"accept"), (b"vary", b"origin"), (b"x-a", b"1")), b"")
    c = Captured(200, ((b"vary", b"origin"), (b"vary", b"accept")), b"")
    assert compare(p, c, DiffOptions()) == {
        "header.vary": ("accept, origin", "origin, accept"),
        "header.x-a": ("1", "<missing>"),
    }


def test_default_ignored_headers_are_not_compared() -> None:
    p = Captured(200, ((b"date", b"Mon"), (b"server", b"a"), (b"x-request-id", b"1")), b"")
    c = Captured(200, ((b"date", b"Tue"), (b"via", b"1.1 gw"), (b"content-length", b"9")), b"")
    assert compare(p, c, DiffOptions()) == {}


def test_configured_ignored_headers_are_matched_case_insensitively() -> None:
    p = Captured(200, ((b"x-trace", b"a"),), b"")
    c = Captured(200, ((b"x-trace", b"b"),), b"")
    assert compare(p, c, DiffOptions(ignore_headers=frozenset({"X-Trace"}))) == {}


def test_set_cookie_compares_only_the_number_of_lines() -> None:
    p = Captured(200, ((b"set-cookie", b"sid=1"),), b"")
    same_count = Captured(200, ((b"set-cookie", b"sid=2"),), b"")
    more = Captured(200, ((b"set-cookie", b"sid=2"), (b"set-cookie", b"csrf=3")), b"")
    none = Captured(200, (), b"")
    assert compare(p, same_count, DiffOptions()) == {}
    assert compare(p, more, DiffOptions()) == {"header.set-cookie": ("<redacted>", "<redacted>")}
    assert compare(p, none, DiffOptions()) == {"header.set-cookie": ("<redacted>", "<missing>")}


def test_value_blind_header_renders_counts_when_not_a_credential() -> None:
    p = Captured(200, ((b"link", b"<a>"),), b"")
    c = Captured(200, ((b"link", b"<b>"), (b"link", b"<c>")), b"")
    options = DiffOptions(value_blind_headers=frozenset({"link"}))
    assert compare(p, c, options) == {"header.link": ("1 value", "2 values")}


def test_credential_headers_are_redacted_in_compare() -> None:
    p = Captured(200, ((b"authorization", b"Bearer secret1"), (b"cookie", b"a=1")), b"")
    c = Captured(200, ((b"authorization", b"Bearer secret2"),), b"")
    assert compare(p, c, DiffOptions()) == {
        "header.authorization": ("<redacted>", "<redacted>"),
        "header.cookie": ("<redacted>", "<missing>"),
    }


def test_redact_keeps_other_fields_and_missing() -> None:
    assert redact("header.proxy-authorization", "Basic eA==") == "<redacted>"
    assert redact("header.proxy-authorization", "<missing>") == "<missing>"
    assert redact("header.accept", "text/html") == "text/html"
    assert redact("$.authorization", '"x"') == '"x"'


# --- JSON structure -------------------------------------------------------------------------


def test_nested_json_paths_name_keys_indexes_and_odd_keys() -> None:
    a = {"user": {"name": "ann"}, "items": [{"price": 1}, {"price": 2}], "a.b": 1, "x y": [0]}
    b = {"user": {"name": "bob"}, "items": [{"price": 1}, {"price": 3}], "a.b": 2, "x y": [1]}
    assert diff_json(a, b) == {
        "$.user.name": ('"ann"', '"bob"'),
        "$.items[1].price": ("2", "3"),
        '$["a.b"]': ("1", "2"),
        '$["x y"][0]': ("0", "1"),
    }


def test_missing_keys_are_reported_on_either_side() -> None:
    assert diff_json({"a": 1, "b": {"c": 2}}, {"a": 1, "d": None}) == {
        "$.b": ('{"c":2}', "<missing>"),
        "$.d": ("<missing>", "null"),
    }


def test_arrays_of_different_length_compare_pairwise_then_missing() -> None:
    assert diff_json([1, 2, 3], [1, 5]) == {"$[1]": ("2", "5"), "$[2]": ("3", "<missing>")}


def test_type_mismatch_is_one_diff_at_that_path() -> None:
    assert diff_json({"a": 1, "b": {"x": 1}, "c": True}, {"a": "1", "b": [1], "c": 1}) == {
        "$.a": ("1", '"1"'),
        "$.b": ('{"x":1}', "[1]"),
        "$.c": ("true", "1"),
    }


def test_root_type_mismatch_is_reported_at_dollar() -> None:
    assert diff_json({"a": 1}, [1]) == {"$": ('{"a":1}', "[1]")}


def test_int_and_float_with_the_same_value_are_equal() -> None:
    assert diff_json({"n": 1}, {"n": 1.0}) == {}


def test_ignore_glob_star_matches_one_key_or_index() -> None:
    a = {"meta": {"t": 1, "host": "a"}, "items": [{"updated_at": 1, "id": 1}], "n": 1}
    b = {"meta": {"t": 2, "host": "b"}, "items": [{"updated_at": 2, "id": 2}], "n": 1}
    options = {"ignore_paths": ("$.meta.*", "$.items[*].updated_at")}
    assert diff_json(a, b, **options) == {"$.items[0].id": ("1", "2")}


def test_ignore_glob_double_star_matches_any_depth_and_drops_subtrees() -> None:
    a = {"etag": 1, "x": {"y": [{"etag": 1, "v": 1}]}, "debug": {"deep": {"a": 1}}}
    b = {"etag": 2, "x": {"y": [{"etag": 2, "v": 2}]}, "debug": {"deep": {"a": 2, "b": 3}}}
    options = {"ignore_paths": ("$.**.etag", "$.debug")}
    assert diff_json(a, b, **options) == {"$.x.y[0].v": ("1", "2")}


def test_ignore_glob_quoted_key_and_literal_index() -> None:
    a = {"a.b": 1, "l": [1, 1]}
    b = {"a.b": 2, "l": [2, 2]}
    assert diff_json(a, b, ignore_paths=('$["a.b"]', "$.l[0]")) == {"$.l[1]": ("1", "2")}


@pytest.mark.parametrize("pattern", ["meta.*", "$..x", "$[x]", '$["open', "$.a]"])
def test_bad_glob_patterns_fail_at_construction(pattern: str) -> None:
    with pytest.raises(ValueError):
        DiffOptions(ignore_paths=(pattern,))


def test_numeric_tolerance_within_and_outside() -> None:
    assert diff_json({"p": 100.0}, {"p": 100.9}, numeric_tolerance=0.01) == {}
    assert diff_json({"p": 100.0}, {"p": 102}, numeric_tolerance=0.01) == {"$.p": ("100.0", "102")}
    assert diff_json({"p": 100.0}, {"p": 100.9}) == {"$.p": ("100.0", "100.9")}


def test_numeric_tolerance_never_makes_booleans_equal() -> None:
    assert diff_json({"b": True}, {"b": False}, numeric_tolerance=1.0) == {"$.b": ("true", "false")}


def test_unordered_array_with_same_items_reordered_has_no_diff() -> None:
    a = {"tags": ["a", "b", {"k": 1, "j": 2}], "other": [1, 2]}
    b = {"tags": [{"j": 2, "k": 1}, "b", "a"], "other": [1, 2]}
    assert diff_json(a, b, unordered_paths=("$.tags",)) == {}


def test_unordered_array_with_different_items_is_one_diff_at_the_array() -> None:
    a = {"tags": ["a", "b", "c"]}
    b = {"tags": ["c", "a", "x"]}
    assert diff_json(a, b, unordered_paths=("$.tags",)) == {
        "$.tags": ("3 items (1 unmatched)", "3 items (1 unmatched)")
    }


def test_unordered_only_applies_at_the_chosen_path() -> None:
    a = {"tags": ["a", "b"], "ordered": ["a", "b"]}
    b = {"tags": ["b", "a"], "ordered": ["b", "a"]}
    assert set(diff_json(a, b, unordered_paths=("$.tags",))) == {"$.ordered[0]", "$.ordered[1]"}


def test_unordered_items_honour_masks_and_ignored_paths() -> None:
    a = {"rows": [{"id": "0b5e1c9a-1111-4a2b-8c3d-000000000001", "seen": 1, "v": 1}, {"v": 2}]}
    b = {"rows": [{"v": 2}, {"id": "0B5E1C9A-2222-4A2B-8C3D-000000000002", "seen": 9, "v": 1}]}
    options = {
        "unordered_paths": ("$.rows",),
        "ignore_paths": ("$.rows[*].seen",),
        "masks": ("uuid",),
    }
    assert diff_json(a, b, **options) == {}


# --- masks and text --------------------------------------------------------------------------


def test_uuid_mask_hides_ids_case_insensitively() -> None:
    a = {"id": "order 1f0e4c2a-9b7d-4e3f-8a21-0c5d6e7f8a9b"}
    b = {"id": "order 2A0E4C2A-9B7D-4E3F-8A21-0C5D6E7F8A9B"}
    assert diff_json(a, b, masks=("uuid",)) == {}
    assert diff_json(
        a, {"id": "invoice 2a0e4c2a-9b7d-4e3f-8a21-0c5d6e7f8a9b"}, masks=("uuid",)
    ) == {"$.id": ('"order <masked>"', '"invoice <masked>"')}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("2026-11-23T10:00:00Z", "2026-11-24T11:30:59Z"),
        ("at 2026-11-23T10:00:00.123+01:00", "at 2027-01-01T00:00:00-05:00"),
        ("Mon, 23 Nov 2026 10:00:00 GMT", "Tue, 24 Nov 2026 11:00:00 GMT"),
    ],
)
def test_timestamp_mask_hides_iso_and_http_dates(a: str, b: str) -> None:
    assert diff_json({"t": a}, {"t": b}, masks=("timestamp",)) == {}
    assert diff_json({"t": a}, {"t": b}) != {}


def test_custom_regex_mask() -> None:
    a, b = {"trace": "req-123 ok"}, {"trace": "req-987 ok"}
    assert diff_json(a, b, masks=(r"req-\d+",)) == {}


def test_invalid_mask_regex_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="invalid mask"):
        DiffOptions(masks=("(unclosed",))


def test_non_json_body_differs_as_size_and_digest() -> None:
    p = Captured(200, TEXT, b"hello world")
    c = Captured(200, TEXT, b"hello  world")
    primary, candidate = compare(p, c, DiffOptions())["body"]
    assert primary.startswith("<11 bytes sha1:") and candidate.startswith("<12 bytes sha1:")
    assert primary != candidate


def test_text_normalize_collapses_whitespace_and_applies_masks() -> None:
    options = DiffOptions(text_normalize=True, masks=("timestamp",))
    p = Captured(200, TEXT, b"  hello\n\tworld at 2026-11-23T10:00:00Z ")
    c = Captured(200, TEXT, b"hello world   at 2026-11-23T10:05:00Z")
    assert compare(p, c, options) == {}
    other = Captured(200, TEXT, b"hello there")
    assert compare(p, other, options) == {"body": ("hello world at <masked>", "hello there")}


def test_invalid_json_falls_back_to_body_comparison() -> None:
    p = Captured(200, JSON, b'{"a": 1}')
    c = Captured(200, JSON, b'{"a": 1')
    assert set(compare(p, c, DiffOptions())) == {"body"}
    nan = Captured(200, JSON, b'{"a": NaN}')
    assert set(compare(nan, Captured(200, JSON, b'{"a": NaN }'), DiffOptions())) == {"body"}


def test_json_suffix_content_type_is_compared_structurally() -> None:
    problem = ((b"content-type", b"application/problem+json; charset=utf-8"),)
    p = Captured(400, problem, b'{"title": "a"}')
    c = Captured(400, problem, b'{"title":"b"}')
    assert compare(p, c, DiffOptions()) == {"$.title": ('"a"', '"b"')}


def test_truncated_bodies_are_not_compared() -> None:
    p = Captured(200, TEXT, b"abc", truncated=True)
    c = Captured(200, TEXT, b"xyz")
    assert compare(p, c, DiffOptions()) == {}


# --- bounds -----------------------------------------------------------------------------------


def test_long_values_are_truncated_with_an_ellipsis() -> None:
    out = diff_json({"s": "x" * 50}, {"s": "y" * 50}, max_value_chars=10)
    assert out == {"$.s": ('"xxxxxxxxx…', '"yyyyyyyyy…')}


def test_at_most_max_fields_are_reported() -> None:
    out = diff_json(list(range(500)), [n + 1 for n in range(500)])
    assert len(out) == MAX_FIELDS
    assert list(out)[:2] == ["$[0]", "$[1]"]


def test_very_deep_json_is_compared_as_a_subtree_below_the_depth_bound() -> None:
    def nest(leaf: int, depth: int) -> object:
        value: object = leaf
        for _ in range(depth):
            value = {"a": value}
        return value

    out = diff_json(nest(1, 100), nest(2, 100))
    assert len(out) == 1
    (path,) = out
    assert path == "$" + ".a" * 64


# --- templater ----------------------------------------------------------------------------------


def test_templater_uses_the_first_matching_configured_pattern() -> None:
    t = Templater(["/users/{user}/orders/{order}", "/users/{u}/orders/{o}", "/api/orders/{id}"])
    assert t.template("/users/ann/orders/7") == "/users/{user}/orders/{order}"
    assert t.template("/api/orders/abc") == "/api/orders/{id}"


def test_templater_placeholders_need_a_non_empty_segment_and_literals_match_exactly() -> None:
    t = Templater(["/api/orders/{id}"])
    assert t.template("/api/orders/") == "/api/orders/"
    assert t.template("/api/invoices/abc") == "/api/invoices/abc"
    assert t.template("/api/orders/abc/lines") == "/api/orders/abc/lines"


def test_templater_collapses_numbers_uuids_and_long_hex() -> None:
    t = Templater()
    assert t.template("/orders/12345/lines/2") == "/orders/{n}/lines/{n}"
    assert t.template("/u/1F0E4C2A-9B7D-4E3F-8A21-0C5D6E7F8A9B") == "/u/{uuid}"
    assert t.template("/blobs/deadbeefcafebabe0123") == "/blobs/{hex}"
    assert t.template("/blobs/deadbeef") == "/blobs/deadbeef"
    assert t.template("/v2/items") == "/v2/items"


# --- significance --------------------------------------------------------------------------------


def test_field_that_is_pure_noise_is_not_significant() -> None:
    # A timestamp differs in every comparison, including primary vs primary.
    assert not significant(diffs=100, compared=100, noise=50, noise_compared=50)


def test_field_without_noise_is_significant_above_the_absolute_threshold() -> None:
    assert significant(diffs=5, compared=100, noise=0, noise_compared=50)


def test_rate_below_the_absolute_threshold_is_not_significant() -> None:
    assert not significant(diffs=2, compared=10_000, noise=0, noise_compared=1000)
    assert significant(diffs=2, compared=10_000, noise=0, noise_compared=1000, absolute=0.0001)


def test_noise_must_be_exceeded_by_the_relative_margin() -> None:
    # d = 0.55, n = 0.5: (d - n) / n = 0.1, below the default 0.2.
    assert not significant(diffs=55, compared=100, noise=50, noise_compared=100)
    assert significant(diffs=70, compared=100, noise=50, noise_compared=100)


def test_no_noise_samples_counts_as_zero_noise() -> None:
    assert significant(diffs=10, compared=100, noise=0, noise_compared=0)
    assert not significant(diffs=0, compared=0, noise=0, noise_compared=0)
