"""The circuit breaker opens after repeated failures and lets one trial through later."""

from abtest.circuit_breaker import CircuitBreaker


def test_opens_then_half_opens_then_closes():
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, open_s=5, clock=lambda: now[0])
    breaker.failure("u")
    assert breaker.allow("u")
    breaker.failure("u")
    assert breaker.is_open("u") and not breaker.allow("u")
    now[0] = 6
    assert breaker.allow("u")  # the one trial
    assert not breaker.allow("u")  # others wait for it
    breaker.failure("u")
    assert not breaker.allow("u")
    now[0] = 12
    assert breaker.allow("u")
    breaker.success("u")
    assert breaker.allow("u") and breaker.allow("u")
