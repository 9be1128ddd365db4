"""Realistic shop traffic through the gateway, with an SLO gate on the result.

``bench.py`` measures raw proxy overhead against nginx; this file answers a different question:
does the gateway keep real shop traffic healthy (cookie sessions, JSON APIs, uploads, downloads,
a slow report) while it routes between the legacy monolith and the new services?

Run headless against the demo gateway (default host http://127.0.0.1:8080)::

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 20 -r 5 -t 30s \\
        -H http://127.0.0.1:8080 --only-summary

The process exits 1 when the run breaks the SLO (failure ratio above ``--slo-max-fail-ratio``,
default 1 %, or p95 above ``--slo-p95-ms``, default 1000 ms, or no requests at all), else 0, so
the command can gate CI. Drop ``--headless`` to get the web UI on http://127.0.0.1:8089.

Traffic mix (task weights), roughly what a shop sees: catalog browsing dominates, order pages
are next, account pages and re-logins follow, and uploads, downloads and the slow sales report
are occasional. Every simulated user sends its own ``X-User-Id`` header so sticky routing can
keep it on one backend for the whole run, the way a real customer would be pinned.
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Any

from locust import HttpUser, between, events, task
from locust.runners import WorkerRunner

logger = logging.getLogger(__name__)

ITEM_IDS = range(1, 51)
SEED_USER_IDS = range(1, 21)
SEED_ORDER_IDS = range(1, 31)
PASSWORD = "secret"
UPLOAD_BYTES = 64 * 1024
DOWNLOAD_BYTES = 256 * 1024
PAGE_SIZES = (10, 20, 50)

#: One shared random payload: generating 64 KiB per request would cost load-generator CPU.
UPLOAD_PAYLOAD = random.Random(1).randbytes(UPLOAD_BYTES)

#: Numbers simulated users within this load-generator process (distinct sticky keys).
_user_numbers = itertools.count(1)


@events.init_command_line_parser.add_listener
def add_slo_arguments(parser: Any) -> None:
    """SLO thresholds as CLI options, so CI can tighten them without editing this file."""
    parser.add_argument(
        "--slo-max-fail-ratio",
        type=float,
        default=0.01,
        help="exit 1 if the failure ratio exceeds this (default 0.01)",
    )
    parser.add_argument(
        "--slo-p95-ms",
        type=float,
        default=1000.0,
        help="exit 1 if the overall p95 response time exceeds this (default 1000)",
    )


class ShopCustomer(HttpUser):
    """A logged-in customer browsing the catalog, checking and placing orders."""

    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        """Pick a seed account, pin a sticky key, then log in like a browser would."""
        number = next(_user_numbers)
        self.sticky_key = f"loadtest-{number}"
        self.client.headers["X-User-Id"] = self.sticky_key
        self.shop_user_id = SEED_USER_IDS[(number - 1) % len(SEED_USER_IDS)]
        self.username = self._username_for(self.shop_user_id)
        self.login()

    def _username_for(self, user_id: int) -> str:
        """Read the account name from the profile API instead of hard-coding seed data."""
        with self.client.get(
            f"/api/users/{user_id}", name="/api/users/[id]", catch_response=True
        ) as response:
            if response.status_code == 200:
                try:
                    username = response.json().get("username")
                except ValueError:
                    username = None
                if isinstance(username, str) and username:
                    return username
                response.failure("user profile has no username")
            else:
                response.failure(f"status {response.status_code}")
        return f"user{user_id}"

    def login(self) -> None:
        """POST /login; the session cookie lands in the client's cookie jar."""
        with self.client.post(
            "/login",
            json={"username": self.username, "password": PASSWORD},
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"login failed with {response.status_code}")
            elif "session" not in self.client.cookies:
                response.failure("login response set no session cookie")

    # --- catalog browsing (heaviest) ---------------------------------------------------------

    @task(4)
    def home(self) -> None:
        self.client.get("/")

    @task(12)
    def list_items(self) -> None:
        limit = random.choice(PAGE_SIZES)
        offset = random.randrange(0, 50, 10)
        self.client.get(f"/api/items?limit={limit}&offset={offset}", name="/api/items?limit&offset")

    @task(18)
    def item_detail(self) -> None:
        item_id = random.choice(ITEM_IDS)
        self.client.get(f"/api/items/{item_id}", name="/api/items/[id]")

    @task(3)
    def user_profile(self) -> None:
        user_id = random.choice(SEED_USER_IDS)
        self.client.get(f"/api/users/{user_id}", name="/api/users/[id]")

    # --- orders (medium) ---------------------------------------------------------------------

    @task(5)
    def my_orders(self) -> None:
        self.client.get(f"/api/orders?user_id={self.shop_user_id}", name="/api/orders?user_id")

    @task(5)
    def order_detail(self) -> None:
        order_id = random.choice(SEED_ORDER_IDS)
        self.client.get(f"/api/orders/{order_id}", name="/api/orders/[id]")

    @task(3)
    def place_order(self) -> None:
        lines = [
            {"item_id": item_id, "qty": random.randint(1, 3)}
            for item_id in random.sample(ITEM_IDS, random.randint(1, 3))
        ]
        with self.client.post(
            "/api/orders",
            json={"user_id": self.shop_user_id, "items": lines},
            catch_response=True,
        ) as response:
            if response.status_code != 201:
                response.failure(f"expected 201, got {response.status_code}")

    # --- account ------------------------------------------------------------------------------

    @task(4)
    def me(self) -> None:
        with self.client.get("/api/me", catch_response=True) as response:
            if response.status_code == 401:
                # Session lost (e.g. monolith restarted): count it, then log in again.
                response.failure("session not recognised")
                self.login()
            elif response.status_code != 200:
                response.failure(f"status {response.status_code}")

    @task(1)
    def relogin(self) -> None:
        self.client.cookies.clear()
        self.login()

    # --- occasional heavy requests -------------------------------------------------------------

    @task(1)
    def upload(self) -> None:
        with self.client.post(
            "/api/upload",
            data=UPLOAD_PAYLOAD,
            headers={"Content-Type": "application/octet-stream"},
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            try:
                received = response.json().get("bytes")
            except ValueError:
                received = None
            if received is not None and received != UPLOAD_BYTES:
                response.failure(f"monolith received {received} of {UPLOAD_BYTES} bytes")

    @task(1)
    def download(self) -> None:
        with self.client.get(
            f"/api/download?size={DOWNLOAD_BYTES}", name="/api/download?size", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
            elif len(response.content) != DOWNLOAD_BYTES:
                response.failure(f"got {len(response.content)} of {DOWNLOAD_BYTES} bytes")

    @task(1)
    def sales_report(self) -> None:
        # Slow on purpose (~300 ms in the monolith); keeps long requests in the mix.
        self.client.get("/api/reports/sales")


@events.quitting.add_listener
def enforce_slo(environment: Any, **_kwargs: Any) -> None:
    """Set the process exit code from the SLO so a headless run can gate CI.

    Workers in a distributed run only see their share of the stats; the master decides.
    """
    if isinstance(environment.runner, WorkerRunner):
        return
    options = environment.parsed_options
    max_fail_ratio = getattr(options, "slo_max_fail_ratio", 0.01)
    max_p95_ms = getattr(options, "slo_p95_ms", 1000.0)
    total = environment.stats.total
    p95 = total.get_response_time_percentile(0.95) or 0.0
    if total.num_requests == 0:
        logger.error("SLO failed: no requests were made")
        environment.process_exit_code = 1
    elif total.fail_ratio > max_fail_ratio:
        logger.error(
            "SLO failed: failure ratio %.2f%% > %.2f%%",
            total.fail_ratio * 100,
            max_fail_ratio * 100,
        )
        environment.process_exit_code = 1
    elif p95 > max_p95_ms:
        logger.error("SLO failed: p95 %.0f ms > %.0f ms", p95, max_p95_ms)
        environment.process_exit_code = 1
    else:
        logger.info(
            "SLO met: failure ratio %.2f%%, p95 %.0f ms over %d requests",
            total.fail_ratio * 100,
            p95,
            total.num_requests,
        )
        environment.process_exit_code = 0
