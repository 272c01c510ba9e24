"""Fixtures for the SDK's tests, which run against a real gateway named by `XPAND_URL` and
`XPAND_API_KEY` (`tests/it/python_sdk.rs` starts one, with forecast shards of 8 rows, and a
worker only once the `before_worker` tests have canceled their jobs, which could otherwise
finish first). `XPAND_TEST_CLIP` names a short video with a face, for `anonymize`."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import xpand


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.environ.get("XPAND_URL") or not os.environ.get("XPAND_API_KEY"):
        pytest.exit("set XPAND_URL and XPAND_API_KEY to a gateway (see tests/it/python_sdk.rs)", 2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `before_worker` tests first: they need jobs that can only wait in the queue."""
    items.sort(key=lambda item: item.get_closest_marker("before_worker") is None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def client() -> Iterator[xpand.Client]:
    with xpand.Client() as c:
        yield c


@pytest.fixture
def clip() -> Path:
    path = os.environ.get("XPAND_TEST_CLIP")
    if not path:
        pytest.skip("XPAND_TEST_CLIP is not set")
    return Path(path)


def sheet(rows: int, length: int = 24) -> list[list[float]]:
    """Seasonal rows of a spreadsheet, each a little different."""
    return [
        [round(100 + r + 10 * math.sin((c + r) / 3), 3) for c in range(length)] for r in range(rows)
    ]
