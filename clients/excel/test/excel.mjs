#!/usr/bin/env node
// Why this file exists: tests/it/excel.rs runs the add-in's functions file in headless Chromium
// through this driver (the system's /usr/bin/chromium, driven by playwright-core from
// tests/browser/, started by tests/browser/chromium.mjs). The page is test/harness.html, served
// by the test from an origin the gateway lists for CORS; it fakes Excel. One argument, a JSON
// plan: { gateway, apiKey, page, cancel, refused, main, level? }, each formula being
// { range, horizon, level? }. One line of JSON on stdout per step:
//
//   {"step":"canceled", ...}  the `cancel` formula's job was accepted, was waiting (no worker
//                             yet), and its formula was canceled; the gateway says `canceled`.
//                             The `refused` formula (a text cell) has its error by then.
//                             The driver then waits for a line on stdin (the test checks the
//                             balance, then starts a worker) before the next step.
//   {"step":"done", ...}      the `main` (and `level`) formulas streamed to their end.
//
// Each step carries what the formulas' setResult calls recorded and the frames the page's
// socket sent; the test asserts on them. Exit 0 after "done", 1 on any failure.
import { createInterface } from 'node:readline';
import { launchChromium } from '../../../tests/browser/chromium.mjs';

const plan = JSON.parse(process.argv[2] ?? '{}');
const lines = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once('line', resolve));

/** @param {Record<string, unknown>} report */
const emit = (report) => process.stdout.write(`${JSON.stringify(report)}\n`);

/** GET a path of the gateway with the plan's key. */
async function gateway(path) {
  const resp = await fetch(`${plan.gateway}${path}`, { headers: { Authorization: `Bearer ${plan.apiKey}` } });
  if (!resp.ok) throw new Error(`GET ${path}: ${resp.status}`);
  return resp.json();
}

async function waitFor(what, check, ms = 15_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

let browser;
let page;
const logs = [];
try {
  browser = await launchChromium();
  page = await browser.newPage();
  page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
  await page.goto(plan.page);
  // What a person enters in the task pane, injected.
  await page.evaluate(async ({ gateway, apiKey }) => {
    await OfficeRuntime.storage.setItem('xpand.gatewayUrl', gateway);
    await OfficeRuntime.storage.setItem('xpand.apiKey', apiKey);
  }, plan);

  const invoke = (address, f) => page.evaluate(
    ({ address, f }) => invoke('FORECAST', [f.range, f.horizon, f.level ?? null], address),
    { address, f },
  );
  const results = (address) => page.evaluate((a) => invocations[a].results, address);
  const frames = () => page.evaluate(() => frames);

  // Step 1: a text cell is refused; a job with no worker to run it waits, and is canceled.
  await invoke('refused', plan.refused);
  await invoke('cancel', plan.cancel);
  const accepted = await waitFor('the cancel formula\'s job to be accepted', async () => {
    const { sent, received } = await frames();
    const submit = sent.find((f) => f.op === 'submit' && f.job.params.horizon === plan.cancel.horizon);
    return submit && received.find((f) => f.event === 'accepted' && f.ref === submit.ref);
  });
  const jobId = accepted.job.id;
  await waitFor('the job to wait in the queue', async () => (await gateway(`/v1/jobs/${jobId}`)).status === 'queued');
  await waitFor('the refused formula\'s error', async () => (await results('refused')).some((r) => r.error));
  await page.evaluate(() => invocations.cancel.onCanceled());
  await waitFor('the gateway to cancel the job', async () => (await gateway(`/v1/jobs/${jobId}`)).status === 'canceled');
  emit({
    step: 'canceled',
    job: jobId,
    cancel_results: await results('cancel'),
    refused_results: await results('refused'),
    sent: (await frames()).sent,
  });

  // Step 2, once the test has checked the balance and started a worker.
  await nextLine();
  await invoke('main', plan.main);
  if (plan.level) await invoke('level', plan.level);
  await page.evaluate(() => Promise.race([
    XpandExcel.whenIdle(),
    new Promise((_, reject) => setTimeout(() => reject(new Error('the formulas did not end within 30 s')), 30_000)),
  ]));
  emit({
    step: 'done',
    main_results: await results('main'),
    level_results: plan.level ? await results('level') : null,
    sent: (await frames()).sent,
    logs,
  });
  process.exitCode = 0;
} catch (e) {
  // What the page saw, to tell why.
  const seen = await page?.evaluate(() => ({ invocations, frames })).catch(() => undefined);
  const report = JSON.stringify({ step: 'error', error: String(e?.stack ?? e), seen, logs });
  process.stdout.write(`${report.split(plan.apiKey).join('…')}\n`);
  process.exitCode = 1;
} finally {
  lines.close();
  if (browser) await browser.close();
}
