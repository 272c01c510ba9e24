// The client against a real gateway, as an app would use it. `tests/it/js_client.rs` starts the
// gateway (forecast shards of 8 rows) with no worker, runs this file with XPAND_URL and
// XPAND_API_KEY, and starts a worker WORKER_DELAY_MS later: the first two tests act while jobs
// can only wait, the rest after the worker is up.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Xpand, XpandError } from '../src/index.js';

const baseURL = process.env.XPAND_URL;
const apiKey = process.env.XPAND_API_KEY;
if (!baseURL || !apiKey) throw new Error('set XPAND_URL and XPAND_API_KEY');
const client = new Xpand({ baseURL, apiKey });

/** @param {number} rows */
function sheet(rows) {
  return Array.from({ length: rows }, (_, r) =>
    Array.from({ length: 24 }, (_, c) => 100 + r + 10 * Math.sin((c + r) / 3)));
}

/** @param {number} rows @param {number} horizon */
function forecastJob(rows, horizon) {
  return { kind: 'forecast', input: { series: sheet(rows) }, params: { horizon }, max_fee: 10_000_000 };
}

test('a canceled job resolves canceled and its escrow comes back', { timeout: 30_000 }, async () => {
  const before = await client.account();
  const socket = client.socket();
  try {
    const following = socket.submit(forecastJob(16, 3));
    // No worker has joined yet: the job waits in the queue, its price held.
    await waitFor(async () => (await queuedJobs()).length === 1);
    const [queued] = await queuedJobs();
    const canceled = await socket.cancel(queued);
    assert.equal(canceled.status, 'canceled');
    const followed = await following;
    assert.equal(followed.id, canceled.id);
    assert.equal(followed.status, 'canceled');
    assert.deepEqual(await client.account(), before);
  } finally {
    socket.close();
  }
});

test('a job followed over a socket that drops still resolves, with its output', { timeout: 30_000 }, async () => {
  const socket = client.socket({ reconnectDelayMs: 100 });
  try {
    const done = socket.submit(forecastJob(16, 4), { idempotencyKey: 'js-drop-1' });
    await waitFor(async () => (await queuedJobs()).length === 1);
    const ws = await socket.opening;
    ws?.close(4000, 'the test drops the socket');
    const job = await done;
    assert.equal(job.status, 'succeeded');
    assert.ok(socket.reconnects >= 1, 'the socket reopened');
    const output = /** @type {{ forecasts: number[][] }} */ (job.output);
    assert.equal(output.forecasts.length, 16);
  } finally {
    socket.close();
  }
});

test('REST: submit and wait, typed refusals naming the cell, idempotency', async () => {
  const job = await client.jobs.submit(forecastJob(3, 5), { wait: 30 });
  assert.equal(job.status, 'succeeded');
  const { forecasts } = /** @type {{ forecasts: number[][] }} */ (job.output);
  assert.equal(forecasts.length, 3);
  assert.ok(forecasts.every((row) => row.length === 5 && row.every(Number.isFinite)));
  assert.deepEqual(await client.jobs.get(job.id), job);

  const bad = forecastJob(2, 3);
  bad.input.series[1][4] = /** @type {any} */ ('n/a');
  await assert.rejects(client.jobs.submit(bad), (e) => {
    assert.ok(e instanceof XpandError);
    assert.equal(e.status, 422);
    assert.equal(e.errors[0].field, 'input.series[1][4]');
    return true;
  });

  const first = await client.jobs.submit(forecastJob(2, 2), { idempotencyKey: 'js-rest-1' });
  const again = await client.jobs.submit(forecastJob(2, 2), { idempotencyKey: 'js-rest-1' });
  assert.equal(again.id, first.id);
});

test('a socket streams each slice of rows and its bands before the job ends, in order', { timeout: 30_000 }, async () => {
  const socket = client.socket();
  try {
    /** @type {{ offset: number, rows: number[][], lower: number[][] }[]} */
    const slices = [];
    /** @type {string[]} */
    const accepted = [];
    const request = forecastJob(40, 6);
    request.params = { ...request.params, level: 90 };
    const job = await socket.submit(request, {
      onAccepted: (j) => accepted.push(j.id),
      onPartial: (rows, offset, intervals) =>
        slices.push({ offset, rows, lower: intervals?.[0]?.lower ?? [] }),
    });
    assert.equal(job.status, 'succeeded');
    assert.deepEqual(accepted, [job.id], 'told the id as the job was taken');
    assert.equal(slices.length, 5, 'one slice per shard of 8 rows');
    slices.sort((a, b) => a.offset - b.offset);
    const output = /** @type {any} */ (job.output);
    assert.deepEqual(slices.flatMap((s) => s.rows), output.forecasts);
    assert.equal(output.intervals[0].level, 90);
    assert.deepEqual(slices.flatMap((s) => s.lower), output.intervals[0].lower);
  } finally {
    socket.close();
  }
});

test('a token minted from the key reads the account; a bad one is a typed 401', async () => {
  const { token } = await client.token({ scopes: ['account:read'], ttlSeconds: 120 });
  const browser = new Xpand({ baseURL, token });
  assert.ok(Number.isInteger((await browser.account()).available));
  const forged = new Xpand({ baseURL, token: 'not-a-token', maxRetries: 0 });
  await assert.rejects(forged.account(), (e) => e instanceof XpandError && e.status === 401);
});

/** The ids of the account's queued jobs. */
async function queuedJobs() {
  const page = await client.jobs.list({ status: 'queued' });
  return page.jobs.map((job) => job.id);
}

/** @param {() => Promise<boolean>} condition */
async function waitFor(condition, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 50));
  }
}
