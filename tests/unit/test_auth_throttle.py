from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from dockmirror.auth.throttle import (
    ADDRESS_LIMIT,
    APP_ID_CEILING,
    LIMIT,
    LoginThrottle,
    Throttle,
    client_subject,
)


def test_limit_within_window() -> None:
    clock = Clock()
    throttle = Throttle(clock, limit=10, window=60)
    for _ in range(9):
        throttle.failed("client 10.0.0.1")
        clock.advance(1)
    assert throttle.retry_after("client 10.0.0.1") is None
    throttle.failed("client 10.0.0.1")  # the 10th failure, at t=9
    assert throttle.retry_after("client 10.0.0.1") == 51  # the first one leaves at t=60
    assert throttle.retry_after("client 10.0.0.2") is None
    clock.advance(50.5)
    assert throttle.retry_after("client 10.0.0.1") == 1
    clock.advance(0.5)
    assert throttle.retry_after("client 10.0.0.1") is None


def test_slow_failures_never_throttle() -> None:
    clock = Clock()
    throttle = Throttle(clock, limit=10, window=60)
    for _ in range(100):
        throttle.failed("appId 'app_x'")
        assert throttle.retry_after("appId 'app_x'") is None
        clock.advance(7)


def test_memory_is_bounded() -> None:
    clock = Clock()
    throttle = Throttle(clock, limit=3, window=60, max_tracked=100)
    for i in range(1000):
        throttle.failed(f"appId {i}")
    assert len(throttle._failures) == 100
    clock.advance(61)
    throttle.failed("appId new")
    assert list(throttle._failures) == ["appId new"]


def test_client_subject() -> None:
    assert client_subject("192.0.2.7") == "client 192.0.2.7"
    assert client_subject("2001:db8:1:2:3:4:5:6") == "client 2001:db8:1:2::/64"
    assert client_subject("2001:db8:1:2:ffff::1") == "client 2001:db8:1:2::/64"
    assert client_subject("::ffff:192.0.2.7") == "client 192.0.2.7"
    assert client_subject("-") == "client -"


def test_failures_lock_out_the_failing_address_only() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(LIMIT):
        throttle.failed("app_victim", "203.0.113.66")
    assert throttle.retry_after("app_victim", "203.0.113.66") == 60
    assert throttle.retry_after("app_victim", "198.51.100.7") is None
    assert throttle.retry_after("app_other", "203.0.113.66") is None
    # The same /64 is the same address.
    for _ in range(LIMIT):
        throttle.failed("app_victim", "2001:db8:1:2::1")
    assert throttle.retry_after("app_victim", "2001:db8:1:2::ffff") == 60
    assert throttle.retry_after("app_victim", "2001:db8:1:3::1") is None


def test_an_address_trying_many_app_ids_is_throttled() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for i in range(ADDRESS_LIMIT):
        throttle.failed(f"app_{i}", "203.0.113.66")
    assert throttle.retry_after("app_fresh", "203.0.113.66") == 60
    assert throttle.retry_after("app_fresh", "203.0.113.67") is None


def test_app_id_ceiling_refuses_failing_addresses_only() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for i in range(APP_ID_CEILING):
            throttle.failed("app_victim", f"10.{i // 250}.{i % 250}.1")
    finally:
        globalLogPublisher.removeObserver(events.append)
    [warning] = [e for e in events if "distributed attack" in str(e.get("action"))]
    assert warning["subject"] == "appId 'app_victim'"
    # Each of those addresses failed once: under the ceiling they may go on.
    assert throttle.retry_after("app_victim", "10.0.0.1") == 60
    assert throttle.retry_after("app_other", "10.0.0.1") is None
    # An address that has not failed with this appId still gets its chance.
    assert throttle.retry_after("app_victim", "192.0.2.1") is None
    clock.advance(60)
    assert throttle.retry_after("app_victim", "10.0.0.1") is None
