#!/usr/bin/env node
// Cross-origin calls as an add-in's task pane makes them, in headless Chromium (the system's
// /usr/bin/chromium, driven by playwright-core, which downloads no browser):
//
//   node tests/browser/cors.mjs <gateway_url> <api_key> <listed_page_url> <unlisted_page_url>
//
// From a page on the listed origin it exchanges the API key for a token (POST /v1/auth/token),
// reads the account with the token (GET /v1/account), submits a forecast with an
// Idempotency-Key and `Prefer: wait` (a preflighted POST) and reads its Location header, and
// reads a refusal (a bad token's 401 problem). From a page on the unlisted origin the same
// account read must be blocked by the browser. Prints one line of JSON with what each page saw
// and exits 0 when the browser behaved as described, 1 otherwise, 2 on bad usage.
import { launchChromium } from './chromium.mjs';

const [gateway, apiKey, listedUrl, unlistedUrl] = process.argv.slice(2);
if (!gateway || !apiKey || !listedUrl || !unlistedUrl) {
  console.error('usage: node tests/browser/cors.mjs <gateway_url> <api_key> <listed_page_url> <unlisted_page_url>');
  process.exit(2);
}

// Runs in the listed page: what an add-in does, step by step, each step's outcome recorded.
async function listedCalls({ gateway, apiKey }) {
  const seen = {};
  const minted = await fetch(`${gateway}/v1/auth/token`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${apiKey}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({}),
  });
  seen.token_status = minted.status;
  const { token } = await minted.json();
  const account = await fetch(`${gateway}/v1/account`, { headers: { Authorization: `Bearer ${token}` } });
  seen.account_status = account.status;
  seen.available = (await account.json()).available;
  const submitted = await fetch(`${gateway}/v1/jobs`, {
    method: 'POST',
    headers: {
      Authorization: `Bearer ${token}`,
      'Content-Type': 'application/json',
      'Idempotency-Key': 'cors-1',
      Prefer: 'wait=30',
    },
    body: JSON.stringify({
      kind: 'forecast',
      input: { series: [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]] },
      params: { horizon: 3 },
      max_fee: 1000000,
    }),
  });
  seen.submit_status = submitted.status;
  seen.location = submitted.headers.get('location');
  seen.job_status = (await submitted.json()).status;
  const refused = await fetch(`${gateway}/v1/account`, { headers: { Authorization: 'Bearer not-a-token' } });
  seen.refused_status = refused.status;
  seen.refused_type = refused.headers.get('content-type');
  return seen;
}

// Runs in the unlisted page: the browser must not let it read the answer.
async function unlistedCall({ gateway, apiKey }) {
  try {
    const resp = await fetch(`${gateway}/v1/account`, { headers: { Authorization: `Bearer ${apiKey}` } });
    return { blocked: false, status: resp.status };
  } catch (e) {
    return { blocked: true, error: String(e) };
  }
}

const report = { ok: false };
let browser;
try {
  browser = await launchChromium();
  const page = await browser.newPage();
  await page.goto(listedUrl);
  report.listed = await page.evaluate(listedCalls, { gateway, apiKey });
  await page.goto(unlistedUrl);
  report.unlisted = await page.evaluate(unlistedCall, { gateway, apiKey });
  const l = report.listed;
  report.ok = l.token_status === 200 && l.account_status === 200 && Number.isInteger(l.available)
    && l.submit_status === 201 && l.job_status === 'succeeded' && /^\/v1\/jobs\//.test(l.location || '')
    && l.refused_status === 401 && l.refused_type === 'application/problem+json'
    && report.unlisted.blocked === true;
} catch (e) {
  report.error = String(e).split(apiKey).join('…');
} finally {
  if (browser) await browser.close();
}
console.log(JSON.stringify(report));
process.exit(report.ok ? 0 : 1);
