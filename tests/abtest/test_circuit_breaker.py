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


def test_a_last_resort_joins_the_trial_and_a_release_frees_it():
    now = [0.0]
    breaker = CircuitBreaker(threshold=1, open_s=5, clock=lambda: now[0])
    breaker.failure("u")
    assert not breaker.allow("u", last_resort=True)  # open: refused even with nowhere else to go
    now[0] = 6
    assert breaker.allow("u")  # the trial
    assert not breaker.allow("u")  # a call with another arm to try waits for it
    assert breaker.allow("u", last_resort=True)  # a call with none is tried rather than certainly refused
    breaker.release("u")  # the trial said nothing about the upstream (the request's fault, a client gone)
    assert breaker.allow("u")  # so the next call is the trial
    breaker.release("never-seen")
