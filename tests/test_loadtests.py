"""Fast checks for the load-test tooling in ``loadtests/``.

The benchmark and the locust scenario are only run by hand or in a dedicated CI job, so a typo
or a route-file format drift would otherwise surface only when someone needs the numbers. The
locustfile is compiled but never imported here: importing locust monkey-patches the standard
library with gevent, which would break every other test in the session.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from strangler import config

LOADTESTS = Path(__file__).resolve().parent.parent / "loadtests"
sys.path.insert(0, str(LOADTESTS))

import bench  # noqa: E402

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:8080/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms  412.07us   1.02s    89.61%
    Req/Sec    20.53k     2.67k   25.62k    81.00%
  Latency Distribution
     50%  612.00us
     75%    1.45ms
     90%    2.10ms
     99%    1.20s
  205395 requests in 10.00s, 44.42MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 12
Requests/sec:  20539.33
Transfer/sec:      4.44MB
"""


def test_loadtest_files_compile() -> None:
    files = [str(LOADTESTS / "bench.py"), str(LOADTESTS / "locustfile.py")]
    subprocess.run([sys.executable, "-m", "py_compile", *files], check=True)


def test_parse_wrk_output_units_and_errors() -> None:
    result = bench.parse_wrk_output(WRK_OUTPUT)
    assert result.requests_per_sec == pytest.approx(20539.33)
    assert result.requests == 205395
    assert result.duration_s == pytest.approx(10.0)
    assert result.p50_ms == pytest.approx(0.612)
    assert result.percentiles_ms["75"] == pytest.approx(1.45)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.latency_avg_ms == pytest.approx(1.52)
    assert result.latency_stdev_ms == pytest.approx(0.41207)
    assert result.latency_max_ms == pytest.approx(1020.0)
    assert result.non_2xx_3xx == 12
    assert result.socket_errors == {"connect": 0, "read": 3, "write": 0, "timeout": 2}
    assert result.errors == 17


def test_parse_wrk_output_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        bench.parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


@pytest.mark.parametrize(
    ("text", "ms"), [("379.00us", 0.379), ("1.45ms", 1.45), ("2.01s", 2010.0), ("1.00m", 60000.0)]
)
def test_to_ms(text: str, ms: float) -> None:
    assert bench.to_ms(text) == pytest.approx(ms)


def test_ratio_line_format() -> None:
    nginx = bench.WrkResult(requests_per_sec=40000.0, percentiles_ms={"50": 0.61})
    gateway = bench.WrkResult(requests_per_sec=10800.0, percentiles_ms={"50": 1.45})
    assert bench.ratio_line(nginx, gateway, "plain") == (
        "ratio gateway/nginx: throughput 0.27, p50 added +0.84 ms "
        "(nginx 0.61 ms, gateway 1.45 ms), scenario=plain"
    )


def test_rounds_report_each_numbers_median() -> None:
    runs = [
        bench.WrkResult(requests_per_sec=rps, percentiles_ms={"50": p50}, paced_p50_ms=paced)
        for rps, p50, paced in ((9000.0, 3.0, 0.9), (12000.0, 1.0, 0.5), (10000.0, 2.0, 0.7))
    ]
    median = bench.median_result(runs)
    assert median.requests_per_sec == 10000.0
    assert median.p50_ms == 2.0
    assert median.paced_p50_ms == 0.7
    assert bench.median_result(runs[:1]) is runs[0]


def test_rounds_need_a_versus_scenario() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "3"])
    assert bench.parse_args(["--rounds", "3", "--versus", "plain"]).rounds == 3


def test_warmup_defaults_to_the_short_one_and_may_not_be_negative() -> None:
    assert bench.parse_args([]).warmup == bench.WARMUP_SECONDS
    assert bench.parse_args(["--warmup", "16"]).warmup == 16
    with pytest.raises(SystemExit):
        bench.parse_args(["--warmup", "-1"])


@pytest.mark.parametrize("name", sorted(bench.SCENARIOS))
def test_scenario_route_files_are_valid(name: str) -> None:
    """Every benchmark scenario must produce a route file the gateway accepts."""
    ctx = bench.ScenarioContext("http://127.0.0.1:9", port=18080, admin_port=19090)
    scenario = bench.SCENARIOS[name](ctx)
    assert scenario.path.startswith("/")
    config.loads(scenario.routes_yaml, filename=f"bench-{name}.yaml")


def test_nginx_configs_stay_on_loopback(tmp_path: Path) -> None:
    for conf in (bench.backend_conf(tmp_path, 1234), bench.proxy_conf(tmp_path, 1235, 1234)):
        listens = [line.strip() for line in conf.splitlines() if line.strip().startswith("listen")]
        assert listens and all(line.startswith("listen 127.0.0.1:") for line in listens)
        assert "access_log off;" in conf


def test_locustfile_runs_headless_against_the_demo_within_its_slo(
    gateway: Any, monolith: str, orders: str, tmp_path: Path
) -> None:
    """The realistic mix through a real gateway, the way the README runs it (shortened)."""
    demo = config.load(LOADTESTS.parent / "routes" / "demo.yaml").model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    demo["backends"] = {"legacy": {"url": monolith}, "orders": {"url": orders}}
    gw = gateway(demo)
    locust = Path(sys.executable).parent / "locust"
    proc = subprocess.run(
        [
            str(locust),
            "-f",
            str(LOADTESTS / "locustfile.py"),
            "--headless",
            "-u",
            "10",
            "-r",
            "10",
            "-t",
            "6s",
            "-H",
            gw.url,
            "--only-summary",
            "--csv",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = (tmp_path / "run_stats.csv").read_text().splitlines()
    total = next(line for line in stats if ",Aggregated," in line).split(",")
    assert int(total[2]) > 50  # requests
    assert int(total[3]) == 0  # failures
