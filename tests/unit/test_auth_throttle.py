from twisted.internet.task import Clock

from dockmirror.auth.throttle import Throttle, client_subject


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


def test_any_subject_throttles() -> None:
    clock = Clock()
    throttle = Throttle(clock, limit=3, window=60)
    for address in ("client 10.0.0.1", "client 10.0.0.2", "client 10.0.0.3"):
        throttle.failed(address, "appId 'app_x'")
    assert throttle.retry_after("client 10.0.0.9", "appId 'app_x'") == 60
    assert throttle.retry_after("client 10.0.0.1", "appId 'app_y'") is None


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
