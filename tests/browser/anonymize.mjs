#!/usr/bin/env node
// End-to-end check of the /anonymize page in headless Chromium (the system's /usr/bin/chromium,
// driven by playwright-core, which downloads no browser):
//
//   node tests/browser/anonymize.mjs <base_url> <api_key> <video_path> <expected_duration_seconds>
//   SCREENSHOT=/tmp/anonymize.png node tests/browser/anonymize.mjs http://127.0.0.1:8080 xp_... in.mp4 2.0
//
// It opens <base_url>/anonymize, types the API key, uploads the video, starts the job, waits (180 s at
// most) for body[data-state=done] — failing fast with the page's #message if it turns `failed` —
// and then checks that the #result video loads (readyState >= 2, videoWidth > 0, a decoded frame
// that is not one flat colour), has the expected duration (within 0.25 s) and plays (currentTime
// passes 0.3 s within 5 s, muted), and that the page's Content-Security-Policy blocked nothing
// (a securitypolicyviolation event). Prints one line of JSON ({"ok": true|false, ...}) on stdout and
// exits 0 on success, 1 on failure (reason and the page's console errors also go to stderr), 2 on
// bad usage. Set up the browser and playwright-core with scripts/setup-browser.sh.
import { existsSync, statSync } from 'node:fs';
import { resolve } from 'node:path';
import { launchChromium } from './chromium.mjs';

const JOB_TIMEOUT_MS = 180_000;
const DURATION_TOLERANCE_S = 0.25;
const PLAY_TARGET_S = 0.3;
const PLAY_TIMEOUT_MS = 5_000;
const LOAD_TIMEOUT_MS = 15_000;

const [baseArg, apiKey, videoArg, expectedArg] = process.argv.slice(2);
const expected = Number(expectedArg);
if (!baseArg || !apiKey || !videoArg || expectedArg === undefined || !Number.isFinite(expected)) {
  console.error('usage: node tests/browser/anonymize.mjs <base_url> <api_key> <video_path> <expected_duration_seconds>');
  process.exit(2);
}
const videoPath = resolve(videoArg);
if (!existsSync(videoPath) || !statSync(videoPath).isFile()) {
  console.error(`anonymize.mjs: no such video file: ${videoPath}`);
  process.exit(2);
}
const base = baseArg.replace(/\/+$/, '');
const pageUrl = `${base}/anonymize`;

class Failure extends Error {}
const consoleErrors = [];
const report = { ok: false, url: `${base}/anonymize`, video: videoPath, expected_duration: expected };
const started = Date.now();
let browser;

// A hard stop, in case something below hangs past its own timeouts.
const watchdog = setTimeout(() => finish(new Failure('watchdog: the whole check took more than 5 minutes')), 300_000);
watchdog.unref();

// Keep the API key out of what is printed (Playwright's errors quote the URL), and colour codes.
function redact(text) {
  let out = text.replace(/\u001b\[[0-9;]*m|\\u001b\[[0-9;]*m/g, '');
  if (apiKey.length >= 4) out = out.split(apiKey).join('…').split(encodeURIComponent(apiKey)).join('…');
  return out;
}

let finished = false;
async function finish(error) {
  if (finished) return;
  finished = true;
  report.elapsed_s = +((Date.now() - started) / 1000).toFixed(2);
  if (error) {
    report.ok = false;
    report.reason = error instanceof Failure ? error.message : `${error.name || 'Error'}: ${error.message}`;
    report.console_errors = consoleErrors;
  }
  console.log(redact(JSON.stringify(report)));
  if (error) {
    console.error(redact(`FAIL: ${report.reason}`));
    for (const line of consoleErrors) console.error(redact(`  page: ${line}`));
  }
  try { await browser?.close(); } catch { /* already gone */ }
  process.exit(error ? 1 : 0);
}

async function screenshot(page) {
  const path = process.env.SCREENSHOT;
  if (!path || !page) return;
  try {
    await page.screenshot({ path, fullPage: true, timeout: 10_000 });
    report.screenshot = path;
  } catch (e) {
    consoleErrors.push(`(screenshot failed: ${e.message})`);
  }
}

let page;
try {
  browser = await launchChromium();
  report.browser = browser.version();
  const context = await browser.newContext({ viewport: { width: 900, height: 1000 } });
  page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const where = msg.location()?.url;
    consoleErrors.push(msg.text() + (where ? ` (${where.replace(/\?.*$/, '')})` : ''));
  });
  page.on('pageerror', (err) => consoleErrors.push(`uncaught: ${err.message}`));
  page.on('requestfailed', (req) => consoleErrors.push(`request failed: ${req.method()} ${req.url().replace(/key=[^&]*/, 'key=…')} (${req.failure()?.errorText})`));
  // Record every data-state the page goes through.
  await page.addInitScript(() => {
    window.__states = [];
    // What the page's Content-Security-Policy blocked: anything is a failure.
    window.__violations = [];
    document.addEventListener('securitypolicyviolation', (e) => {
      window.__violations.push(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'}`);
    });
    document.addEventListener('DOMContentLoaded', () => {
      const note = () => {
        const s = document.body.dataset.state;
        if (window.__states[window.__states.length - 1] !== s) window.__states.push(s);
      };
      note();
      new MutationObserver(note).observe(document.body, { attributes: true, attributeFilter: ['data-state'] });
    });
  });

  const response = await page.goto(pageUrl, { waitUntil: 'load', timeout: 30_000 });
  if (!response || !response.ok()) throw new Failure(`GET /anonymize answered ${response ? response.status() : 'nothing'}`);
  const initial = await page.evaluate(() => document.body.dataset.state);
  if (initial !== 'idle') throw new Failure(`the page starts in state ${JSON.stringify(initial)}, not "idle"`);

  await page.fill('#api-key', apiKey);
  await page.dispatchEvent('#api-key', 'change');
  await page.setInputFiles('#video-file', videoPath);
  const jobStarted = Date.now();
  await page.click('#start');

  try {
    await page.waitForFunction(() => ['done', 'failed'].includes(document.body.dataset.state), null,
      { timeout: JOB_TIMEOUT_MS, polling: 100 });
  } catch (e) {
    const state = await page.evaluate(() => document.body.dataset.state).catch(() => '?');
    const status = await page.textContent('#status').catch(() => '');
    throw new Failure(`no result within ${JOB_TIMEOUT_MS / 1000} s (state ${state}, status ${JSON.stringify(status)})`);
  }
  report.job_s = +((Date.now() - jobStarted) / 1000).toFixed(2);
  report.states = await page.evaluate(() => window.__states);
  report.status_text = (await page.textContent('#status'))?.trim();
  if (await page.evaluate(() => document.body.dataset.state) === 'failed') {
    const message = (await page.innerText('#message'))?.trim().replace(/\s*\n\s*/g, ' | ');
    throw new Failure(`the page failed: ${message || '(empty #message)'}`);
  }
  report.details = await page.evaluate(() => {
    const out = {};
    const dts = document.querySelectorAll('#details dt');
    for (const dt of dts) out[dt.textContent] = dt.nextElementSibling?.textContent;
    return out;
  });

  const measured = await page.evaluate(async ({ loadMs, playMs, target }) => {
    const v = document.getElementById('result');
    const dl = document.getElementById('download');
    const m = { src_is_blob: (v.currentSrc || v.src || '').startsWith('blob:'), download: dl?.getAttribute('download') || null };
    if (v.readyState < 2) {
      const how = await new Promise((res) => {
        const t = setTimeout(() => res('timeout'), loadMs);
        v.addEventListener('loadeddata', () => { clearTimeout(t); res('loadeddata'); }, { once: true });
        v.addEventListener('error', () => { clearTimeout(t); res('error'); }, { once: true });
        if (v.error) { clearTimeout(t); res('error'); }
      });
      if (how !== 'loadeddata') {
        m.load_error = how === 'error' ? `MediaError ${v.error?.code}: ${v.error?.message || ''}` : `no loadeddata within ${loadMs} ms`;
      }
    }
    m.readyState = v.readyState;
    m.videoWidth = v.videoWidth;
    m.videoHeight = v.videoHeight;
    m.duration = v.duration;
    if (m.load_error || v.readyState < 2) return m;
    try {  // The first decoded frame must not be one flat colour.
      const c = document.createElement('canvas');
      c.width = Math.min(v.videoWidth, 160); c.height = Math.max(1, Math.round(c.width * v.videoHeight / v.videoWidth));
      const g = c.getContext('2d', { willReadFrequently: true });
      g.drawImage(v, 0, 0, c.width, c.height);
      const px = g.getImageData(0, 0, c.width, c.height).data;
      let sum = 0, sq = 0, n = 0;
      for (let i = 0; i < px.length; i += 4) { const y = 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2]; sum += y; sq += y * y; n++; }
      const mean = sum / n;
      m.frame_mean = +mean.toFixed(2);
      m.frame_stddev = +Math.sqrt(Math.max(0, sq / n - mean * mean)).toFixed(2);
    } catch (e) { m.frame_error = String(e); }
    v.muted = true;
    try { await v.play(); } catch (e) { m.play_error = String(e); return m; }
    const t0 = performance.now();
    while (v.currentTime <= target && performance.now() - t0 < playMs && !v.error && !v.ended) {
      await new Promise((r) => setTimeout(r, 50));
    }
    m.currentTime = v.currentTime;
    m.play_wall_ms = Math.round(performance.now() - t0);
    if (v.error) m.play_error = `MediaError ${v.error.code}: ${v.error.message || ''}`;
    v.pause();
    return m;
  }, { loadMs: LOAD_TIMEOUT_MS, playMs: PLAY_TIMEOUT_MS, target: PLAY_TARGET_S });
  report.result = measured;

  if (!measured.src_is_blob) throw new Failure('#result has no blob: src');
  if (measured.load_error) throw new Failure(`#result did not load: ${measured.load_error}`);
  if (!(measured.readyState >= 2)) throw new Failure(`#result readyState ${measured.readyState} < 2`);
  if (!(measured.videoWidth > 0)) throw new Failure(`#result videoWidth is ${measured.videoWidth}`);
  if (!(Math.abs(measured.duration - expected) < DURATION_TOLERANCE_S)) {
    throw new Failure(`#result duration ${measured.duration} s, expected ${expected} ± ${DURATION_TOLERANCE_S} s`);
  }
  if (measured.frame_error) throw new Failure(`could not read a frame of #result: ${measured.frame_error}`);
  if (!(measured.frame_stddev > 1)) throw new Failure(`the first frame of #result is flat (luma stddev ${measured.frame_stddev})`);
  if (measured.play_error) throw new Failure(`#result does not play: ${measured.play_error}`);
  if (!(measured.currentTime > PLAY_TARGET_S)) {
    throw new Failure(`#result played only to ${measured.currentTime} s in ${PLAY_TIMEOUT_MS / 1000} s`);
  }
  report.csp_violations = await page.evaluate(() => window.__violations);
  if (report.csp_violations.length) {
    throw new Failure(`the page's Content-Security-Policy blocked: ${report.csp_violations.join('; ')}`);
  }
  report.ok = true;
  await screenshot(page);
  await finish(null);
} catch (e) {
  await screenshot(page);
  await finish(e);
}
