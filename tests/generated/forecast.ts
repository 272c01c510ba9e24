// What a TypeScript developer writes with the client openapi-typescript and openapi-fetch make
// from xpand's document: upload a file and read it back, run a forecast with bounds, and meet a
// refused key as a typed problem. Compiled with `tsc --strict` against the types generated at
// test time (generate.mjs), then run by tests/it/generated_clients.rs; any mismatch throws.
import { createHash } from "node:crypto";
import assert from "node:assert/strict";
import createClient from "openapi-fetch";
import type { components, paths } from "./openapi.js";

type Job = components["schemas"]["Job"];
type ForecastOutput = components["schemas"]["ForecastOutput"];

const baseUrl = process.env.XPAND_URL ?? "";
const client = createClient<paths>({
  baseUrl,
  headers: { Authorization: `Bearer ${process.env.XPAND_API_KEY ?? ""}` },
});

// A refused key is a 401 problem, not a silent nothing.
const stranger = createClient<paths>({ baseUrl, headers: { Authorization: "Bearer xp_wrong" } });
const refused = await stranger.GET("/v1/account");
assert.equal(refused.response.status, 401);
assert.equal(refused.error?.status, 401);
assert.match(refused.error?.type ?? "", /unauthorized/);

// Upload: the bytes themselves (openapi-fetch would send JSON of anything it serializes).
const bytes = new TextEncoder().encode("month,units\n1,120\n2,135\n");
const uploaded = await client.POST("/v1/files", {
  body: new Blob([bytes]),
  bodySerializer: (body) => body,
  headers: { "Content-Type": "text/csv" },
});
assert.equal(uploaded.response.status, 201, JSON.stringify(uploaded.error));
const file = uploaded.data;
assert.ok(file);
assert.equal(file.size, bytes.length);
assert.equal(file.sha256, createHash("sha256").update(bytes).digest("hex"));

const downloaded = await client.GET("/v1/files/{id}", {
  params: { path: { id: file.id } },
  parseAs: "arrayBuffer",
});
assert.equal(downloaded.response.status, 200);
assert.deepEqual(new Uint8Array(downloaded.data ?? new ArrayBuffer(0)), bytes);

// A forecast with an 80 % band, waited for in the same request.
const season = [10, 12, 15, 20, 26, 30, 31, 28, 22, 16, 12, 10];
const series = [season.concat(season.map((v) => v + 2)), season.concat(season).map((v) => v * 3)];
const submitted = await client.POST("/v1/jobs", {
  params: { header: { Prefer: "wait=30" } },
  body: { kind: "forecast", max_fee: 1_000_000, input: { series }, params: { horizon: 6, level: 80 } },
});
assert.ok(submitted.data, JSON.stringify(submitted.error));
const job: Job = submitted.data;
assert.equal(job.status, "succeeded", JSON.stringify(job));
const output = job.output as ForecastOutput;
assert.equal(output.forecasts.length, series.length);
for (const row of output.forecasts) {
  assert.equal(row?.length, 6);
}
const band = output.intervals?.[0];
assert.equal(band?.level, 80);
output.forecasts.forEach((row, r) =>
  row?.forEach((value, h) => {
    assert.ok((band?.lower[r]?.[h] ?? Infinity) <= value && value <= (band?.upper[r]?.[h] ?? -Infinity));
  }),
);

const deleted = await client.DELETE("/v1/files/{id}", { params: { path: { id: file.id } } });
assert.equal(deleted.response.status, 204);
console.log(`forecast ${job.id}: ${output.forecasts.length} rows, cost ${job.cost}`);
