"""Every way an upstream can fail, for every provider, against a fake on a real socket."""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import formatdate

import pytest

from fake_upstreams import CannedResponse, FakeUpstream, unused_port
from fake_upstreams.harness import API_KEY, CASES, ProviderCase, RecordingSleep, mint, mint_async
from icegate_server.clock import FrozenClock
from icegate_server.errors import (
    UpstreamAuthFailedError,
    UpstreamError,
    UpstreamQuotaError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)


def assert_keeps_key_secret(error: BaseException) -> None:
    """The key is in no message, repr or chained exception of what a caller may see."""
    seen: BaseException | None = error
    while seen is not None:
        for text in (str(seen), repr(seen), str(getattr(seen, "message", ""))):
            assert API_KEY not in text
            assert "SECRET-1234" not in text
        seen = seen.__cause__ or seen.__context__


def expect_upstream_error(
    case: ProviderCase, fake: FakeUpstream, error_class: type[UpstreamError], **kwargs: object
) -> UpstreamError:
    with pytest.raises(error_class) as caught:
        mint(case, fake.base_url, **kwargs)  # type: ignore[arg-type]
    error = caught.value
    assert error.provider == case.kind.value
    assert_keeps_key_secret(error)
    return error


def test_wrong_key_is_auth_failed_without_retry(case: ProviderCase, fake: FakeUpstream) -> None:
    error = expect_upstream_error(case, fake, UpstreamAuthFailedError,
                                  api_key="sk-test-wrong-9999")
    assert error.upstream_status in (400, 401)  # Google says 400 API_KEY_INVALID
    assert len(fake.requests) == 1
    assert "sk-test-wrong-9999" not in str(error)
    assert "9999" not in str(error)  # no masked echo of the key either


@pytest.mark.parametrize("status", [401, 403])
def test_401_403_are_auth_failed(case: ProviderCase, fake: FakeUpstream, status: int) -> None:
    fake.enqueue(case.error(status, f"bad key {API_KEY}", {case.request_id_header: "rid-auth"}))
    error = expect_upstream_error(case, fake, UpstreamAuthFailedError)
    assert (error.upstream_status, error.upstream_request_id) == (status, "rid-auth")
    assert len(fake.requests) == 1


@pytest.mark.parametrize("status", [400, 404, 422])
def test_bad_request_is_rejected_with_the_upstream_message(
    case: ProviderCase, fake: FakeUpstream, status: int
) -> None:
    fake.enqueue(case.error(status, f"Unknown parameter 'foo' for key {API_KEY}",
                            {case.request_id_header: "rid-400"}))
    error = expect_upstream_error(case, fake, UpstreamRejectedError)
    assert (error.upstream_status, error.upstream_request_id) == (status, "rid-400")
    assert "Unknown parameter 'foo'" in str(error)
    assert "[redacted]" in str(error)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("quota_case", [c for c in CASES if c.quota_error], ids=str)
def test_out_of_quota_is_not_retried(quota_case: ProviderCase) -> None:
    # Orga and Gemini have no out-of-quota answer distinct from rate limiting.
    assert quota_case.quota_error is not None
    with FakeUpstream(quota_case.emulation()) as fake:
        fake.enqueue(quota_case.quota_error)
        error = expect_upstream_error(quota_case, fake, UpstreamQuotaError)
        assert error.upstream_status == 429
        assert error.upstream_request_id
        assert len(fake.requests) == 1


def test_429_without_retry_after_backs_off_then_succeeds(
    case: ProviderCase, fake: FakeUpstream
) -> None:
    fake.enqueue(case.error(429, "Rate limit reached", {}))
    sleep = RecordingSleep()
    token = mint(case, fake.base_url, sleep=sleep)
    assert token.value
    assert sleep.delays == [0.5]
    assert len(fake.requests_to(case.mint_path)) == 2


@pytest.mark.parametrize(
    ("headers", "expected_wait"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after-ms": "150", "retry-after": "5"}, 0.15),  # the ms header wins
        ({"retry-after": "0.25"}, 0.25),
    ],
)
def test_429_honours_retry_after(
    case: ProviderCase, fake: FakeUpstream, headers: dict[str, str], expected_wait: float
) -> None:
    fake.enqueue(case.error(429, "Rate limit reached", headers))
    sleep = RecordingSleep()
    assert mint(case, fake.base_url, sleep=sleep).value
    assert sleep.delays == [pytest.approx(expected_wait)]
    assert len(fake.requests_to(case.mint_path)) == 2


def test_429_honours_retry_after_as_http_date(case: ProviderCase, fake: FakeUpstream) -> None:
    clock = FrozenClock(start=1_700_000_000.0)
    fake.enqueue(case.error(429, "slow down", {"retry-after": formatdate(1_700_000_003.0,
                                                                        usegmt=True)}))
    sleep = RecordingSleep()
    assert mint(case, fake.base_url, sleep=sleep, clock=clock).value
    assert sleep.delays == [pytest.approx(3.0)]


def test_429_with_retry_after_beyond_the_deadline_gives_up_at_once(
    case: ProviderCase, fake: FakeUpstream
) -> None:
    fake.always(case.error(429, "Rate limit reached", {"retry-after": "30"}))
    sleep = RecordingSleep()
    error = expect_upstream_error(case, fake, UpstreamUnavailableError, sleep=sleep, timeout=5.0)
    assert error.retry_after_seconds == 30.0
    assert error.upstream_status == 429
    assert sleep.delays == []
    assert len(fake.requests) == 1


def test_huge_retry_after_without_deadline_gives_up_at_once(
    case: ProviderCase, fake: FakeUpstream
) -> None:
    fake.always(case.error(429, "Rate limit reached", {"retry-after": "3600"}))
    sleep = RecordingSleep()
    error = expect_upstream_error(case, fake, UpstreamUnavailableError, sleep=sleep,
                                  timeout=None)
    assert error.retry_after_seconds == 3600.0
    assert sleep.delays == []
    assert len(fake.requests) == 1


def test_endless_429_gives_up_after_three_attempts(case: ProviderCase, fake: FakeUpstream) -> None:
    fake.always(case.error(429, "Rate limit reached", {"retry-after": "1"}))
    sleep = RecordingSleep()
    error = expect_upstream_error(case, fake, UpstreamUnavailableError, sleep=sleep)
    assert (error.upstream_status, error.retry_after_seconds) == (429, 1.0)
    assert sleep.delays == [1.0, 1.0]
    assert len(fake.requests) == 3


@pytest.mark.parametrize("statuses", [[500], [503, 502], [408]])
def test_5xx_and_408_are_retried_until_success(
    case: ProviderCase, fake: FakeUpstream, statuses: list[int]
) -> None:
    fake.enqueue(*(case.error(status, "The server had an error", {}) for status in statuses))
    sleep = RecordingSleep()
    token = mint(case, fake.base_url, sleep=sleep)
    assert token.value
    assert sleep.delays == [0.5, 1.0][: len(statuses)]
    assert len(fake.requests_to(case.mint_path)) == len(statuses) + 1


def test_endless_503_gives_up_after_three_attempts(case: ProviderCase, fake: FakeUpstream) -> None:
    fake.always(case.error(503, "overloaded", {case.request_id_header: "rid-503"}))
    sleep = RecordingSleep()
    error = expect_upstream_error(case, fake, UpstreamUnavailableError, sleep=sleep)
    assert (error.upstream_status, error.upstream_request_id) == (503, "rid-503")
    assert error.retry_after_seconds is None
    assert sleep.delays == [0.5, 1.0]
    assert len(fake.requests) == 3


def test_x_should_retry_overrides_the_status(case: ProviderCase, fake: FakeUpstream) -> None:
    fake.enqueue(case.error(503, "do not retry", {"x-should-retry": "false"}))
    expect_upstream_error(case, fake, UpstreamUnavailableError)
    assert len(fake.requests) == 1

    fake.enqueue(case.error(400, "transient after all", {"x-should-retry": "true"}))
    assert mint(case, fake.base_url).value
    assert len(fake.requests_to(case.mint_path)) == 3


def test_backoff_longer_than_the_deadline_is_not_slept(
    case: ProviderCase, fake: FakeUpstream
) -> None:
    fake.always(case.error(503, "overloaded", {}))
    sleep = RecordingSleep()
    error = expect_upstream_error(case, fake, UpstreamUnavailableError, sleep=sleep, timeout=0.4)
    assert error.upstream_status == 503
    assert sleep.delays == []
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [
        CannedResponse(200, raw_body=b"{not json"),
        CannedResponse(200, raw_body=b"<html>gateway</html>",
                       headers={"Content-Type": "text/html"}),
        CannedResponse(200, json_body=["a", "list"]),
        CannedResponse(200, json_body={"unexpected": True}),
    ],
    ids=["broken-json", "html", "not-an-object", "missing-fields"],
)
def test_malformed_success_answer_is_unavailable_without_retry(
    case: ProviderCase, fake: FakeUpstream, answer: CannedResponse
) -> None:
    fake.enqueue(answer)
    error = expect_upstream_error(case, fake, UpstreamUnavailableError)
    assert "malformed answer" in str(error)
    assert error.upstream_status == 200
    assert len(fake.requests) == 1


def test_connection_refused_is_retried_then_unavailable(case: ProviderCase) -> None:
    sleep = RecordingSleep()
    with pytest.raises(UpstreamUnavailableError) as caught:
        mint(case, f"http://127.0.0.1:{unused_port()}", sleep=sleep)
    assert caught.value.upstream_status == 0
    assert "could not be reached" in str(caught.value)
    assert sleep.delays == [0.5, 1.0]
    assert_keeps_key_secret(caught.value)


@pytest.mark.parametrize("reset", ["before", "mid_body"])
def test_connection_reset_is_retried(case: ProviderCase, fake: FakeUpstream, reset: str) -> None:
    fake.enqueue(CannedResponse(200, {"value": "ek_partial", "padding": "x" * 200}, reset=reset))
    assert mint(case, fake.base_url).value
    assert len(fake.requests_to(case.mint_path)) == 2


def test_endless_resets_give_up_after_three_attempts(
    case: ProviderCase, fake: FakeUpstream
) -> None:
    fake.always(CannedResponse(200, {"padding": "x" * 200}, reset="mid_body"))
    error = expect_upstream_error(case, fake, UpstreamUnavailableError)
    assert error.upstream_status == 0
    assert len(fake.requests) == 3


def test_slow_upstream_times_out_at_the_callers_deadline(
    case: ProviderCase, fake: FakeUpstream
) -> None:
    fake.always(CannedResponse(200, {}, delay=5.0))
    started = time.monotonic()
    error = expect_upstream_error(case, fake, UpstreamTimeoutError, timeout=0.3)
    assert time.monotonic() - started < 0.3 + 0.25
    assert error.upstream_status == 0
    assert len(fake.requests) == 1


def test_caller_cancellation_cancels_the_request(case: ProviderCase, fake: FakeUpstream) -> None:
    fake.always(CannedResponse(200, {}, delay=5.0))

    async def cancel_midway() -> None:
        task = asyncio.create_task(mint_async(case, fake.base_url, timeout=None))
        assert await asyncio.to_thread(fake.wait_for_requests, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(cancel_midway())
    assert time.monotonic() - started < 1.0


def test_no_log_line_carries_the_key(
    case: ProviderCase, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.enqueue(case.error(503, f"echo {API_KEY}", {}), CannedResponse(reset="before"))
    assert mint(case, fake.base_url).value
    fake.enqueue(case.error(400, f"echo {API_KEY}", {}))
    with pytest.raises(UpstreamRejectedError):
        mint(case, fake.base_url)
    with pytest.raises(UpstreamUnavailableError):
        mint(case, f"http://127.0.0.1:{unused_port()}")
    assert "retrying" in caplog.text
    assert API_KEY not in caplog.text
