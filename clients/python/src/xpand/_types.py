"""The gateway's JSON shapes as `TypedDict`s (from `openapi/openapi.json`): responses stay plain
dicts, as the gateway sent them, while a type checker knows their keys."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

from typing_extensions import NotRequired

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
Scope = Literal["jobs:read", "jobs:write", "account:read"]

TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


class JobProgress(TypedDict):
    shards_done: int
    shards_total: int
    # Video jobs, on `GET /v1/jobs/{id}`: frames masked so far, and in all.
    frames_done: NotRequired[int | None]
    frames_total: NotRequired[int | None]


class JobError(TypedDict):
    code: str
    message: str


class Job(TypedDict):
    """A job as its owner sees it. `output` is the kind's result once it succeeded: for
    `forecast` `{"forecasts": [[...]], "intervals"?: [...]}`, for `anonymize`
    `{"file", "frames", "width", "height", "duration_seconds", "segments", "faces_masked",
    "audio", "size", "sha256"}`."""

    id: str
    kind: str
    status: JobStatus
    params: dict[str, Any]
    progress: JobProgress
    quote: int
    max_fee: int
    escrow: int
    created_at: str
    updated_at: str
    cost: NotRequired[int | None]
    output: NotRequired[dict[str, Any] | None]
    error: NotRequired[JobError | None]
    finished_at: NotRequired[str | None]
    data_expired_at: NotRequired[str | None]


class IntervalRows(TypedDict):
    """One level's bounds around rows of forecasts: `lower` and `upper` have their shape."""

    level: float
    lower: list[list[float]]
    upper: list[list[float]]


class ProgressEvent(TypedDict):
    event: Literal["progress"]
    job_id: str
    status: JobStatus
    shards_done: int
    shards_total: int


class PartialEvent(TypedDict):
    """One shard's slice of the output as soon as it is accepted: `rows` start at `offset`."""

    event: Literal["partial"]
    job_id: str
    shard: int
    offset: int
    rows: list[list[float]]
    intervals: NotRequired[list[IntervalRows] | None]


class EndEvent(TypedDict):
    """The job ended; `job` is its final state (with `output` when it succeeded)."""

    event: Literal["succeeded", "failed", "canceled"]
    job: Job


JobEvent = ProgressEvent | PartialEvent | EndEvent


class FileInfo(TypedDict):
    id: str
    size: int
    sha256: str
    content_type: str
    created_at: str


class Account(TypedDict):
    """Balances in micro-credits: `available` to spend, `held` in escrow for unfinished jobs."""

    id: str
    available: int
    held: int


class Token(TypedDict):
    token: str
    token_type: str
    expires_in: int
    scopes: list[Scope]
