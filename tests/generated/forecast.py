"""What a Python developer writes with the client openapi-python-client makes from xpand's document.

Upload a file and read it back, run a forecast with bounds, and meet a refused key as a typed
problem. Checked with `mypy --strict` together with the package generated at test time, then run
by tests/it/generated_clients.rs; any mismatch fails an assertion.
"""

import hashlib
import io
import os

from xpand_client import AuthenticatedClient
from xpand_client.api.account import account
from xpand_client.api.files import delete_file, download, upload
from xpand_client.api.jobs import submit
from xpand_client.models import (
    FileInfo,
    ForecastInput,
    ForecastJob,
    ForecastOutput,
    ForecastParams,
    Job,
    JobStatus,
    Problem,
)
from xpand_client.types import File, Unset

url = os.environ["XPAND_URL"]
client = AuthenticatedClient(base_url=url, token=os.environ["XPAND_API_KEY"])

# A refused key is a 401 problem, not a silent None.
refused = account.sync(client=AuthenticatedClient(base_url=url, token="xp_wrong"))
assert isinstance(refused, Problem), refused
assert refused.status == 401 and "unauthorized" in refused.type_, refused

# Upload: the bytes themselves, read back whole.
data = b"month,units\n1,120\n2,135\n"
info = upload.sync(client=client, body=File(payload=io.BytesIO(data)))
assert isinstance(info, FileInfo), info
assert info.size == len(data) and info.sha256 == hashlib.sha256(data).hexdigest(), info
fetched = download.sync(info.id, client=client)
assert isinstance(fetched, File), fetched
assert fetched.payload.read() == data

# A forecast with an 80 % band, waited for in the same request.
season = [10.0, 12, 15, 20, 26, 30, 31, 28, 22, 16, 12, 10]
series: list[list[float | None]] = [
    [*season, *(v + 2 for v in season)],
    [v * 3 for v in season * 2],
]
job = submit.sync(
    client=client,
    body=ForecastJob(
        kind="forecast",
        max_fee=1_000_000,
        input_=ForecastInput(series=series),
        params=ForecastParams(horizon=6, level=80.0),
    ),
    prefer="wait=30",
)
assert isinstance(job, Job), job
assert job.status == JobStatus.SUCCEEDED, job
output = job.output
assert isinstance(output, ForecastOutput), output
assert len(output.forecasts) == len(series)
assert not isinstance(output.intervals, Unset)
band = output.intervals[0]
assert band.level == 80
for r, row in enumerate(output.forecasts):
    assert row is not None and len(row) == 6, row
    lower, upper = band.lower[r], band.upper[r]
    assert lower is not None and upper is not None
    assert all(lo <= v <= hi for lo, v, hi in zip(lower, row, upper, strict=True))

assert delete_file.sync_detailed(info.id, client=client).status_code == 204
print(f"forecast {job.id}: {len(output.forecasts)} rows, cost {job.cost}")
