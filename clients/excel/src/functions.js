// The add-in's custom functions: XPAND.FORECAST streams a range's forecasts from the xpand
// gateway into a spilled array, row by row as the gateway's shards finish. It runs in the
// add-in's shared runtime (the task pane's page), where it shares one WebSocket between all
// its formulas, and is built on the JavaScript client (clients/js). esbuild bundles it into
// dist/functions.js; custom-functions-metadata reads the JSDoc below into functions.json.

import { Xpand, XpandError } from '../../js/src/index.js';

/** Where the task pane stores the settings (OfficeRuntime.storage; localStorage outside Office). */
export const SETTINGS = {
  gatewayUrl: 'xpand.gatewayUrl',
  apiKey: 'xpand.apiKey',
  maxFee: 'xpand.maxFee',
};

/** The most one formula may cost, in micro-credits, unless the task pane says otherwise. */
export const DEFAULT_MAX_FEE = 10_000_000;

/** How long a cancel sent over the socket may take before it is sent again over REST. */
const CANCEL_CONFIRM_MS = 5_000;

/** The formulas still streaming (for `XpandExcel.whenIdle`, a test's and a debugger's hook). */
const running = new Set();

// The spill: one row per row of the range, `horizon` forecasts, then with `level` the `horizon`
// lower bounds and the `horizon` upper bounds of the level % prediction interval. Rows not
// computed yet are empty text. The JSDoc below is what Excel shows (functions.json).
/**
 * Forecasts each row of a range on the xpand network, streaming the rows in as they are computed.
 * @customfunction FORECAST
 * @param {any[][]} range Rows of history, oldest value first. Blank cells are filled in by the gateway's rule.
 * @param {number} horizon How many values to forecast for each row (1 to 24).
 * @param {number} [level] Prediction interval level, 50 to 99: adds lower and upper bounds.
 * @param {CustomFunctions.StreamingInvocation<any[][]>} invocation
 */
export function forecast(range, horizon, level, invocation) {
  const run = stream(range, horizon, level, invocation);
  running.add(run);
  run.finally(() => running.delete(run));
}

/**
 * One formula, from the placeholders to the final numbers or an error.
 * @param {any[][]} range
 * @param {number} horizon
 * @param {number | null | undefined} level
 * @param {CustomFunctions.StreamingInvocation<any[][]>} invocation
 */
async function stream(range, horizon, level, invocation) {
  const withLevel = level !== null && level !== undefined && level !== '';
  /** @type {{ jobId?: string, canceled: boolean, cancelSent: boolean, socket?: import('../../js/src/index.js').JobSocket }} */
  const state = { canceled: false, cancelSent: false };
  // Excel cancels a formula that is deleted or edited, or whose range changed: stop its job.
  const stopJob = async () => {
    if (!state.socket || !state.jobId || state.cancelSent) return;
    state.cancelSent = true;
    await cancelJob(state.socket, state.jobId);
  };
  invocation.onCanceled = () => {
    state.canceled = true;
    void stopJob();
  };
  try {
    const series = range.map((row) => row.map(cell));
    const grid = placeholders(series.length, horizon, withLevel);
    const show = () => {
      if (!state.canceled && grid) invocation.setResult(grid.map((row) => row.slice()));
    };
    show();
    const { socket, maxFee } = await connection();
    if (state.canceled) return;
    state.socket = socket;
    const job = {
      kind: 'forecast',
      input: { series },
      params: withLevel ? { horizon, level } : { horizon },
      max_fee: maxFee,
    };
    /** @param {number[][]} rows @param {number} offset @param {Interval[]} [intervals] */
    const onPartial = (rows, offset, intervals) => {
      if (!grid) return;
      paint(grid, rows, offset, horizon, withLevel ? pick(intervals, level) : undefined);
      show();
    };
    const onAccepted = (/** @type {string} */ id) => {
      state.jobId = id;
      // Canceled while the submit was on its way: the job exists now, so stop it.
      if (state.canceled) void stopJob();
    };
    const done = await submit(socket, job, onPartial, onAccepted);
    if (state.canceled) return;
    if (done.status === 'succeeded') {
      // The final output has every row, also those whose slices came while the socket was down.
      const output = /** @type {{ forecasts: number[][], intervals?: Interval[] }} */ (done.output);
      const full = grid ?? output.forecasts.map(() => []);
      paint(full, output.forecasts, 0, horizon, withLevel ? pick(output.intervals, level) : undefined);
      invocation.setResult(full);
    } else {
      const why = done.status === 'failed' ? `the job failed: ${done.error?.message ?? 'no reason given'}` : 'the job was canceled';
      invocation.setResult(excelError('notAvailable', why));
    }
  } catch (e) {
    if (!state.canceled) invocation.setResult(asExcelError(e));
  }
}

/**
 * @typedef {import('../../js/src/index.js').Job} Job
 * @typedef {{ level: number, lower: number[][], upper: number[][] }} Interval
 */

/**
 * Submits over the socket and follows the job to its end, reporting its id as soon as the
 * gateway has accepted it (so that a cancel can name it). A submit whose socket drops before the
 * answer is sent again with the same idempotency key: the gateway answers with the job the first
 * one made.
 * @param {import('../../js/src/index.js').JobSocket} socket
 * @param {import('../../js/src/index.js').SubmitJob} job
 * @param {(rows: number[][], offset: number, intervals?: Interval[]) => void} onPartial
 * @param {(id: string) => void} onAccepted
 * @returns {Promise<Job>}
 */
async function submit(socket, job, onPartial, onAccepted) {
  const idempotencyKey = `excel-${globalThis.crypto.randomUUID()}`;
  for (let attempt = 0; ; attempt++) {
    try {
      return await socket.submit(job, { idempotencyKey, onPartial, onAccepted: (j) => onAccepted(j.id) });
    } catch (e) {
      if (e instanceof XpandError || attempt >= 2) throw e;
    }
  }
}

/**
 * Stops a job with the socket's `cancel` op; the gateway answers with the job, `canceled`,
 * which resolves its follower. If that answer does not come (the socket was down), the cancel
 * goes again over REST.
 * @param {import('../../js/src/index.js').JobSocket} socket
 * @param {string} jobId
 */
async function cancelJob(socket, jobId) {
  const followed = socket.following.get(jobId)?.done;
  try {
    const ws = await socket.open();
    ws.send(JSON.stringify({ op: 'cancel', job_id: jobId }));
    if (!followed) return;
    const confirmed = await Promise.race([followed.then(() => true), sleep(CANCEL_CONFIRM_MS).then(() => false)]);
    if (confirmed) return;
  } catch {
    // The socket cannot open: REST below.
  }
  await socket.cancel(jobId).catch(() => undefined);
}

/** A cell as the gateway takes it: a blank cell (Excel gives "" or null) is `null`. */
function cell(/** @type {unknown} */ value) {
  return value === '' || value === null || value === undefined ? null : value;
}

/**
 * The spill before any row is known: one row per input row, `horizon` columns (three times that
 * with a level), all empty text. None while the horizon is not a whole number the gateway could
 * take: it refuses the formula, and the error is all there is to show.
 * @param {number} rows @param {number} horizon @param {boolean} withLevel
 * @returns {any[][] | undefined}
 */
function placeholders(rows, horizon, withLevel) {
  if (!Number.isInteger(horizon) || horizon < 1 || horizon > 1000 || rows < 1) return undefined;
  const width = withLevel ? 3 * horizon : horizon;
  return Array.from({ length: rows }, () => Array(width).fill(''));
}

/**
 * Writes rows `offset..` of the forecasts (and of the interval's bounds) into the spill.
 * @param {any[][]} grid @param {number[][]} rows @param {number} offset @param {number} horizon
 * @param {Interval | undefined} interval
 */
function paint(grid, rows, offset, horizon, interval) {
  rows.forEach((values, i) => {
    const target = grid[offset + i];
    if (!target) return;
    values.forEach((v, c) => { target[c] = v; });
    interval?.lower[i]?.forEach((v, c) => { target[horizon + c] = v; });
    interval?.upper[i]?.forEach((v, c) => { target[2 * horizon + c] = v; });
  });
}

/**
 * The interval at `level` among those the gateway sent.
 * @param {Interval[] | undefined} intervals @param {number | null | undefined} level
 */
function pick(intervals, level) {
  return intervals?.find((i) => i.level === level) ?? intervals?.[0];
}

/**
 * What a refusal or a failure shows in the cell: a 422 names the offending cell of the range
 * (`input.series[3][5]` is "row 4, column 6 of the range"), or the argument; anything else is
 * #N/A with the gateway's explanation.
 * @param {unknown} e
 */
export function asExcelError(e) {
  if (e instanceof XpandError) {
    if (e.status === 422 && e.errors.length) {
      const [first, ...rest] = e.errors;
      const more = rest.length ? ` (and ${rest.length} more)` : '';
      return excelError('invalidValue', `${describeField(first)}: ${first.detail}${more}`);
    }
    if (e.status === 401 || e.status === 403) {
      return excelError('notAvailable', `the gateway refused the API key (${e.message}): check the XPAND task pane`);
    }
    return excelError('notAvailable', e.message);
  }
  if (e instanceof SettingsMissing) return excelError('notAvailable', e.message);
  return excelError('notAvailable', `cannot reach the xpand gateway: ${e instanceof Error ? e.message : String(e)}`);
}

/**
 * A field of a validation problem, as a person reading the sheet would say it.
 * @param {{ field: string, row?: number | null, column?: number | null }} error
 */
export function describeField({ field, row, column }) {
  const cellAt = /^input\.series\[(\d+)\]\[(\d+)\]$/.exec(field);
  if (cellAt) return `row ${(row ?? Number(cellAt[1])) + 1}, column ${(column ?? Number(cellAt[2])) + 1} of the range`;
  const rowAt = /^input\.series\[(\d+)\]$/.exec(field);
  if (rowAt) return `row ${(row ?? Number(rowAt[1])) + 1} of the range`;
  if (field === 'input.series') return 'the range';
  const param = /^params\.(\w+)$/.exec(field);
  if (param) return param[1];
  return field;
}

/**
 * @param {'invalidValue' | 'notAvailable'} code
 * @param {string} message
 */
function excelError(code, message) {
  return new CustomFunctions.Error(CustomFunctions.ErrorCode[code], message.slice(0, 255));
}

class SettingsMissing extends Error {}

/** @type {{ signature: string, socket: import('../../js/src/index.js').JobSocket, client: Xpand, maxFee: number } | undefined} */
let current;

/**
 * The client and its one socket for the stored settings; a change of settings opens a new one.
 */
async function connection() {
  const settings = await readSettings();
  if (!settings.gatewayUrl || !settings.apiKey) {
    throw new SettingsMissing('set the gateway URL and API key in the XPAND task pane');
  }
  const signature = JSON.stringify(settings);
  if (current?.signature !== signature) {
    current?.socket.close();
    const client = new Xpand({ baseURL: settings.gatewayUrl, apiKey: settings.apiKey });
    const maxFee = Number(settings.maxFee) > 0 ? Math.floor(Number(settings.maxFee)) : DEFAULT_MAX_FEE;
    current = { signature, client, socket: client.socket(), maxFee };
  }
  return current;
}

/** @returns {Promise<{ gatewayUrl?: string, apiKey?: string, maxFee?: string }>} */
export async function readSettings() {
  const storage = store();
  const [gatewayUrl, apiKey, maxFee] = await Promise.all(
    [SETTINGS.gatewayUrl, SETTINGS.apiKey, SETTINGS.maxFee].map((k) => storage.getItem(k)),
  );
  return { gatewayUrl: gatewayUrl ?? undefined, apiKey: apiKey ?? undefined, maxFee: maxFee ?? undefined };
}

/**
 * Saves the settings (the task pane calls this) and checks them by reading the account.
 * @param {{ gatewayUrl: string, apiKey: string, maxFee?: number }} settings
 * @returns {Promise<{ available: number, held: number }>}
 */
export async function saveSettings({ gatewayUrl, apiKey, maxFee }) {
  const storage = store();
  await storage.setItem(SETTINGS.gatewayUrl, gatewayUrl.trim());
  await storage.setItem(SETTINGS.apiKey, apiKey.trim());
  await storage.setItem(SETTINGS.maxFee, String(maxFee ?? DEFAULT_MAX_FEE));
  const { client } = await connection();
  return client.account();
}

/** OfficeRuntime.storage in Office; the page's localStorage elsewhere (a browser preview). */
function store() {
  const office = globalThis.OfficeRuntime?.storage;
  if (office) return office;
  return {
    getItem: async (/** @type {string} */ k) => globalThis.localStorage.getItem(k),
    setItem: async (/** @type {string} */ k, /** @type {string} */ v) => globalThis.localStorage.setItem(k, v),
  };
}

/** @param {number} ms */
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Resolves once every formula has stopped streaming. */
function whenIdle() {
  return Promise.allSettled([...running]).then(() => undefined);
}

globalThis.XpandExcel = { saveSettings, readSettings, whenIdle, describeField };
if (globalThis.CustomFunctions) CustomFunctions.associate('FORECAST', forecast);
