// How the client reads refusals and when it repeats a call, with `fetch` answered in-process:
// the cases a live gateway does not produce on demand (a proxy's HTML error page, a 429 that
// passes). Everything else is tested against a real gateway in client.test.js.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Xpand, XpandError } from '../src/index.js';

/**
 * A `fetch` that answers with `responses` in turn and counts the calls.
 * @param {Response[]} responses
 */
function answering(responses) {
  const calls = [];
  /** @type {typeof fetch} */
  const fetch = async (url, init) => {
    calls.push({ url, init });
    const next = responses.shift();
    if (!next) throw new Error('no more answers');
    return next;
  };
  return { fetch, calls };
}

test('a body that is not JSON becomes a problem quoting it, after the allowed retries', async () => {
  const page = () => new Response('<html>bad gateway</html>', { status: 502, statusText: 'Bad Gateway' });
  const { fetch, calls } = answering([page(), page()]);
  const client = new Xpand({ baseURL: 'http://gateway.test', apiKey: 'xp_test', maxRetries: 1, fetch });
  await assert.rejects(client.account(), (e) => {
    assert.ok(e instanceof XpandError);
    assert.equal(e.status, 502);
    assert.match(e.message, /bad gateway/);
    return true;
  });
  assert.equal(calls.length, 2, 'a read is retried');
});

test('a 429 is waited out for reads and keyed submits, never for a plain submit', async () => {
  const busy = () => new Response(JSON.stringify({ status: 429, title: 'Too many', detail: 'slow down', retry_after: 0.05 }),
    { status: 429, headers: { 'content-type': 'application/problem+json' } });
  const ok = () => new Response(JSON.stringify({ id: 'j', status: 'queued' }), { status: 201 });
  const job = { kind: 'forecast', input: { series: [[1, 2, 3]] }, params: { horizon: 1 }, max_fee: 1 };

  let answers = answering([busy(), ok()]);
  let client = new Xpand({ baseURL: 'http://gateway.test', apiKey: 'xp_test', fetch: answers.fetch });
  assert.equal((await client.jobs.submit(job, { idempotencyKey: 'k1' })).id, 'j');
  assert.equal(answers.calls.length, 2);
  assert.equal(/** @type {any} */ (answers.calls[1].init).headers['Idempotency-Key'], 'k1');

  answers = answering([busy()]);
  client = new Xpand({ baseURL: 'http://gateway.test', apiKey: 'xp_test', fetch: answers.fetch });
  await assert.rejects(client.jobs.submit(job), (e) => e instanceof XpandError && e.status === 429 && e.retryAfter === 0.05);
  assert.equal(answers.calls.length, 1, 'without a key, a repeat could run the job twice');
});
