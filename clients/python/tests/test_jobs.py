"""Jobs through the synchronous client: cancel (while no worker can take the job), submit,
stream, list, idempotent retries that charge once, and the typed errors."""

from __future__ import annotations

import httpx
import pytest

import xpand
from conftest import sheet


@pytest.mark.before_worker
def test_a_streamed_job_canceled_while_queued_ends_canceled_and_refunded(
    client: xpand.Client,
) -> None:
    before = client.account()
    job = client.jobs.submit(
        "forecast", {"series": sheet(16)}, params={"horizon": 3}, max_fee=10_000_000
    )
    assert job["status"] == "queued"
    events = client.jobs.stream(job["id"])
    first = next(events)
    assert first["event"] == "progress" and first["status"] == "queued"
    assert client.jobs.cancel(job["id"])["status"] == "canceled"
    last = list(events)[-1]
    assert last["event"] == "canceled" and last["job"]["id"] == job["id"]
    assert client.account() == before
    with pytest.raises(xpand.ConflictError) as e:
        client.jobs.cancel(job["id"])
    assert e.value.status == 409


def test_partial_rows_stream_in_and_tile_the_output(client: xpand.Client) -> None:
    rows = sheet(40)
    job = client.jobs.submit(
        "forecast", {"series": rows}, params={"horizon": 5, "level": [80, 95]}, max_fee=10_000_000
    )
    partials: list[xpand.PartialEvent] = []
    kinds = []
    for event in client.jobs.stream(job["id"]):
        kinds.append(event["event"])
        if event["event"] == "partial":
            partials.append(event)
    assert kinds[-1] == "succeeded"
    assert len(partials) == 5, kinds  # 40 rows in shards of 8
    final = client.jobs.get(job["id"])
    output = final.get("output") or {}
    stitched: list[list[float]] = [[] for _ in rows]
    for p in partials:
        stitched[p["offset"] : p["offset"] + len(p["rows"])] = p["rows"]
        bands = p.get("intervals") or []
        assert [b["level"] for b in bands] == [80, 95]
        assert all(len(b["lower"]) == len(p["rows"]) for b in bands)
    assert stitched == output["forecasts"]


def test_a_lost_answer_is_retried_with_its_key_and_charged_once(client: xpand.Client) -> None:
    """The first answer to the submit is lost after the gateway acted on it (the connection
    breaks): the client sends it again with the same Idempotency-Key and gets the same job."""
    sent: list[str] = []

    class LoseFirstAnswer(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            if request.method == "POST" and request.url.path == "/v1/jobs":
                sent.append(request.headers["Idempotency-Key"])
                if len(sent) == 1:
                    response.read()
                    response.close()
                    raise httpx.ReadError("the connection broke", request=request)
            return response

    before = client.account()
    jobs_before = sum(1 for _ in client.jobs.list(limit=100))
    flaky = httpx.Client(transport=LoseFirstAnswer(), timeout=90)
    with xpand.Client(http_client=flaky) as retrying:
        job = retrying.jobs.submit(
            "forecast", {"series": sheet(3)}, params={"horizon": 4}, max_fee=10_000_000, wait=True
        )
    flaky.close()
    assert len(sent) == 2 and sent[0] == sent[1]
    job = client.jobs.wait(job["id"])
    assert job["status"] == "succeeded"
    again = client.jobs.submit(
        "forecast",
        {"series": sheet(3)},
        params={"horizon": 4},
        max_fee=10_000_000,
        idempotency_key=sent[0],
    )
    assert again["id"] == job["id"]
    after = client.account()
    assert after["available"] == before["available"] - (job.get("cost") or 0)
    assert (job.get("cost") or 0) > 0
    assert sum(1 for _ in client.jobs.list(limit=100)) == jobs_before + 1


def test_list_pages_through_every_job(client: xpand.Client) -> None:
    for _ in range(3):
        client.jobs.submit(
            "forecast", {"series": sheet(2)}, params={"horizon": 2}, max_fee=10_000_000
        )
    page = client.jobs.list(limit=2)
    assert len(page) == 2 and page.has_next_page()
    paged = [job["id"] for job in page]
    assert paged == [job["id"] for job in client.jobs.list(limit=100)]
    assert len(set(paged)) == len(paged) >= 3
    queued = client.jobs.list(kind="forecast", status="succeeded", limit=100)
    assert all(j["status"] == "succeeded" for j in queued)


def test_a_bad_cell_is_a_typed_error_naming_it(client: xpand.Client) -> None:
    rows: list[list[float | str | None]] = [list(r) for r in sheet(4)]
    rows[3][5] = "n/a"
    before = client.account()
    with pytest.raises(xpand.UnprocessableEntityError) as e:
        client.forecast(rows, 3)
    err = e.value
    assert isinstance(err, xpand.APIError) and err.status == 422
    assert err.type == "https://xpand.dev/problems/validation"
    assert [(f.field, f.row, f.column) for f in err.errors] == [("input.series[3][5]", 3, 5)]
    assert "input.series[3][5]" in err.detail
    assert client.account() == before


def test_a_bad_key_is_an_authentication_error() -> None:
    with (
        xpand.Client(api_key="xp_" + "0" * 64) as bad,
        pytest.raises(xpand.AuthenticationError) as e,
    ):
        bad.account()
    assert e.value.status == 401 and e.value.slug == "unauthorized"


def test_a_fee_below_the_quote_is_refused_naming_the_quote(client: xpand.Client) -> None:
    with pytest.raises(xpand.InsufficientFundsError) as e:
        client.jobs.submit("forecast", {"series": sheet(2)}, params={"horizon": 2}, max_fee=1)
    assert e.value.status == 402 and e.value.slug == "max-fee-below-quote"
    assert (e.value.quote or 0) > 1


def test_an_unknown_job_is_not_found(client: xpand.Client) -> None:
    with pytest.raises(xpand.NotFoundError):
        client.jobs.get("01a245ee-b6c7-77e7-aafb-064de31bfd32")


def test_no_gateway_is_a_connection_error() -> None:
    with (
        xpand.Client(url="http://127.0.0.1:9", api_key="xp_x", max_retries=1) as nowhere,
        pytest.raises(xpand.APIConnectionError),
    ):
        nowhere.account()


def test_a_token_carries_only_the_scopes_it_was_given(client: xpand.Client) -> None:
    token = client.token(scopes=["jobs:read"], ttl_seconds=120)
    assert token["scopes"] == ["jobs:read"] and token["expires_in"] <= 120
    with xpand.Client(api_key=token["token"]) as reader:
        assert len(reader.jobs.list(limit=1)) == 1
        with pytest.raises(xpand.PermissionDeniedError) as e:
            reader.jobs.submit(
                "forecast", {"series": sheet(2)}, params={"horizon": 2}, max_fee=10_000_000
            )
    assert e.value.status == 403
