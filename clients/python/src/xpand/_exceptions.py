"""Typed errors: every refusal the gateway explains with an RFC 9457 problem document becomes an
exception of its own class (chosen by HTTP status), carrying the problem's `type`, `status`,
`detail` and, for validation problems, each offending field (a spreadsheet cell is
`input.series[3][5]`), so callers catch what they can handle and read why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from ._types import Job

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "FieldError",
    "InsufficientFundsError",
    "InternalServerError",
    "JobFailedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "UnprocessableEntityError",
    "XpandError",
]


@dataclass(frozen=True)
class FieldError:
    """One invalid field of a request: `field` is its JSON path (`params.horizon`,
    `input.series[3][5]`); for spreadsheet input `row` and `column` locate the cell (0-based)."""

    field: str
    detail: str
    row: int | None = None
    column: int | None = None


class XpandError(Exception):
    """The base of every error this package raises."""


class APIError(XpandError):
    """A request that did not get the answer it asked for.

    `status` is the HTTP status (None when no response came); `type` the problem's stable
    identifier (`https://xpand.dev/problems/<slug>`); `errors` the offending fields.
    """

    status: int | None
    type: str | None
    title: str | None
    detail: str
    errors: list[FieldError]
    retry_after: float | None
    problem: dict[str, Any]
    request: httpx.Request | None
    response: httpx.Response | None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
        request: httpx.Request | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        problem = problem or {}
        self.status = status
        self.problem = problem
        self.type = _str_or_none(problem.get("type"))
        self.title = _str_or_none(problem.get("title"))
        self.detail = str(problem.get("detail") or message)
        self.errors = [
            FieldError(
                field=str(e.get("field", "")),
                detail=str(e.get("detail", "")),
                row=e.get("row"),
                column=e.get("column"),
            )
            for e in problem.get("errors") or []
            if isinstance(e, dict)
        ]
        self.retry_after = retry_after
        self.request = request
        self.response = response

    @property
    def slug(self) -> str | None:
        """The last part of `type`: `validation`, `insufficient-funds`, `rate-limited`, ..."""
        return self.type.rsplit("/", 1)[-1] if self.type else None


class APIConnectionError(APIError):
    """No answer came: the gateway could not be reached, or the connection broke."""

    def __init__(self, message: str = "connection error", *, request: httpx.Request | None = None):
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    """The gateway did not answer in time."""

    def __init__(self, request: httpx.Request | None = None) -> None:
        super().__init__("request timed out", request=request)


class APIStatusError(APIError):
    """The gateway answered with a 4xx or 5xx status; see the subclasses for common ones."""

    status: int


class BadRequestError(APIStatusError):
    """400: the body is not JSON the gateway can read."""


class AuthenticationError(APIStatusError):
    """401: no credential, or one that is invalid, expired or revoked."""


class InsufficientFundsError(APIStatusError):
    """402: the job costs more than the available balance, or than `max_fee`. Nothing was
    charged; `quote` is what the job would cost, `available` the balance when it is the cause."""

    @property
    def quote(self) -> int | None:
        value = self.problem.get("quote")
        return value if isinstance(value, int) else None

    @property
    def available(self) -> int | None:
        value = self.problem.get("available")
        return value if isinstance(value, int) else None


class PermissionDeniedError(APIStatusError):
    """403: the credential lacks a scope, or a quota would be exceeded."""


class NotFoundError(APIStatusError):
    """404: no such job or file for this account (another account's is "not found" too)."""


class ConflictError(APIStatusError):
    """409: the resource's state forbids it (cancel a finished job, delete a file a job reads)."""


class PayloadTooLargeError(APIStatusError):
    """413: a body over the gateway's size limit."""


class UnprocessableEntityError(APIStatusError):
    """422: a field is invalid; `errors` names each (`input.series[3][5]` for a cell)."""


class RateLimitError(APIStatusError):
    """429: too many requests or open streams; `retry_after` says how long to wait."""


class InternalServerError(APIStatusError):
    """5xx: the gateway (or a proxy before it) failed or is unavailable."""


class JobFailedError(XpandError):
    """A helper's job ended without output: `failed` (see `code`) or `canceled`."""

    def __init__(self, job: Job) -> None:
        error = job.get("error")
        self.job = job
        self.status = job["status"]
        self.code: str | None = error["code"] if error else None
        message = error["message"] if error else f"the job was {self.status}"
        super().__init__(f"job {job['id']} {self.status}: {message}")


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientFundsError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def error_for_status(
    status: int,
    problem: dict[str, Any],
    *,
    retry_after: float | None = None,
    request: httpx.Request | None = None,
    response: httpx.Response | None = None,
) -> APIStatusError:
    """The exception for a refused request, chosen by its status."""
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
    err = cls(
        f"{status} {detail}",
        status=status,
        problem=problem,
        retry_after=retry_after,
        request=request,
        response=response,
    )
    return err


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
