// The xpand client for JavaScript: REST calls with typed errors and safe retries, and one
// WebSocket that carries many jobs, streams their partial rows, reconnects and re-subscribes.
// It runs wherever `fetch` and `WebSocket` do (browsers, an add-in's task pane, Node 22; Node 20
// with --experimental-websocket) and depends on nothing. Its types come from the gateway's
// OpenAPI document (`src/openapi.d.ts`, generated; a check fails when it drifts).

/** @typedef {import('./openapi.js').components['schemas']} Schemas */
/** @typedef {Schemas['Job']} Job */
/** @typedef {Schemas['JobPage']} JobPage */
/** @typedef {Schemas['Account']} Account */
/** @typedef {Schemas['TokenResponse']} TokenResponse */
/** @typedef {Schemas['Problem']} Problem */
/**
 * What `POST /v1/jobs` takes: one shape per kind (`ForecastJob`, `AnonymizeJob`), each with its
 * kind's own `input` and `params`.
 * @typedef {Schemas['SubmitJob']} SubmitJob
 */
/** @typedef {{ scopes?: Schemas['Scope'][], ttlSeconds?: number }} TokenOptions */

const RETRIED_STATUSES = new Set([429, 502, 503, 504]);

/** A refusal or failure the gateway explained with an RFC 9457 problem document. */
export class XpandError extends Error {
  /**
   * @param {number} status
   * @param {Partial<Problem>} problem
   * @param {number | undefined} retryAfter seconds, from `Retry-After` or the problem
   */
  constructor(status, problem, retryAfter) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.name = 'XpandError';
    this.status = status;
    /** The problem's stable `type` URI. */
    this.type = problem.type;
    /** For validation problems: each offending field (a cell is `input.series[3][5]`). */
    this.errors = problem.errors ?? [];
    this.retryAfter = retryAfter;
    this.problem = problem;
  }
}

/** REST access to one gateway with one credential (an API key on servers, a token in browsers). */
export class Xpand {
  /**
   * @param {{ baseURL: string, apiKey?: string, token?: string, maxRetries?: number,
   *           fetch?: typeof fetch }} options
   */
  constructor({ baseURL, apiKey, token, maxRetries = 2, fetch = globalThis.fetch }) {
    if (!apiKey && !token) throw new TypeError('Xpand needs an apiKey or a token');
    this.baseURL = baseURL.replace(/\/+$/, '');
    this.credential = /** @type {string} */ (apiKey ?? token);
    this.maxRetries = maxRetries;
    // Called unbound: a browser's `fetch` throws "Illegal invocation" when called as a method.
    this.fetch = (/** @type {Parameters<typeof fetch>} */ ...args) => fetch(...args);
    this.jobs = new Jobs(this);
  }

  /**
   * One call. A 429 or 502–504 is retried after its `Retry-After` (or a short back-off) when
   * repeating cannot do anything twice: reads, deletes, and posts with an `Idempotency-Key`.
   * @param {string} method
   * @param {string} path
   * @param {{ body?: unknown, headers?: Record<string, string>, retry?: boolean }} [options]
   * @returns {Promise<{ body: any, headers: Headers, status: number }>}
   */
  async request(method, path, { body, headers = {}, retry = method !== 'POST' } = {}) {
    for (let attempt = 0; ; attempt++) {
      const response = await this.fetch(`${this.baseURL}${path}`, {
        method,
        headers: {
          Authorization: `Bearer ${this.credential}`,
          ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
          ...headers,
        },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const parsed = await readBody(response);
      if (response.ok) return { body: parsed, headers: response.headers, status: response.status };
      const header = Number(response.headers.get('retry-after'));
      const retryAfter = Number.isFinite(header) && header > 0 ? header : parsed?.retry_after;
      if (retry && RETRIED_STATUSES.has(response.status) && attempt < this.maxRetries) {
        await sleep(1000 * (retryAfter ?? 0.5 * 2 ** attempt));
        continue;
      }
      throw new XpandError(response.status, parsed ?? {}, retryAfter);
    }
  }

  /**
   * A short-lived token for this API key, for a browser or a WebSocket URL.
   * @param {TokenOptions} [options]
   * @returns {Promise<TokenResponse>}
   */
  async token({ scopes, ttlSeconds } = {}) {
    const { body } = await this.request('POST', '/v1/auth/token', {
      body: { scopes, ttl_seconds: ttlSeconds },
    });
    return body;
  }

  /** @returns {Promise<Account>} available and held balances, in micro-credits */
  async account() {
    return (await this.request('GET', '/v1/account')).body;
  }

  /**
   * A WebSocket for many jobs at once. It opens on first use with a fresh token (an API key
   * never travels in a URL) and reopens after a drop.
   * @param {{ WebSocket?: typeof WebSocket, reconnectDelayMs?: number }} [options]
   */
  socket(options = {}) {
    return new JobSocket(this, options);
  }
}

/** `/v1/jobs`. */
class Jobs {
  /** @param {Xpand} client */
  constructor(client) {
    this.client = client;
  }

  /**
   * Submits a job. With `idempotencyKey` a retry cannot create or charge twice (and so is
   * retried on 429/503); with `wait` the answer is held until the job ends, up to that many
   * seconds.
   * @param {SubmitJob} job
   * @param {{ idempotencyKey?: string, wait?: number }} [options]
   * @returns {Promise<Job>}
   */
  async submit(job, { idempotencyKey, wait } = {}) {
    /** @type {Record<string, string>} */
    const headers = {};
    if (idempotencyKey) headers['Idempotency-Key'] = idempotencyKey;
    if (wait !== undefined) headers.Prefer = `wait=${wait}`;
    const retry = idempotencyKey !== undefined;
    return (await this.client.request('POST', '/v1/jobs', { body: job, headers, retry })).body;
  }

  /**
   * The account's jobs, newest first, a page at a time (`next_cursor` continues).
   * @param {{ status?: Job['status'], kind?: string, cursor?: string, limit?: number }} [filter]
   * @returns {Promise<JobPage>}
   */
  async list(filter = {}) {
    const query = new URLSearchParams();
    for (const [name, value] of Object.entries(filter)) {
      if (value !== undefined) query.set(name, String(value));
    }
    const suffix = query.size ? `?${query}` : '';
    return (await this.client.request('GET', `/v1/jobs${suffix}`)).body;
  }

  /** @param {string} id @returns {Promise<Job>} */
  async get(id) {
    return (await this.client.request('GET', `/v1/jobs/${encodeURIComponent(id)}`)).body;
  }

  /**
   * Stops a job: nodes are paid for shards already done, the rest is refunded.
   * @param {string} id @returns {Promise<Job>}
   */
  async cancel(id) {
    const path = `/v1/jobs/${encodeURIComponent(id)}/cancel`;
    return (await this.client.request('POST', path, { retry: true })).body;
  }
}

/**
 * What a job followed over the socket reports.
 * @typedef {{ onAccepted?: (job: Job) => void,
 *             onPartial?: (rows: number[][], offset: number, intervals?: IntervalRows[]) => void,
 *             onProgress?: (done: number, total: number) => void }} Followers
 */
/**
 * One level's bounds around a slice of forecast rows (`params.level`).
 * @typedef {Schemas['IntervalRows']} IntervalRows
 */

/**
 * One WebSocket, many jobs. `submit` resolves with the job once it has ended (succeeded, failed
 * or canceled: check `status`), calling `onAccepted` with the job as the gateway takes it (its
 * id is what `cancel` needs) and `onPartial` with each slice of rows as it is accepted, with the
 * slice's prediction intervals when the job asked for levels.
 * A dropped socket is reopened with a fresh token and every unfinished job re-subscribed: a job
 * that ended meanwhile resolves with its final state; slices accepted while the socket was down
 * are in that final output, not sent again.
 */
export class JobSocket {
  /**
   * @param {Xpand} client
   * @param {{ WebSocket?: typeof WebSocket, reconnectDelayMs?: number }} options
   */
  constructor(client, { WebSocket: Impl = globalThis.WebSocket, reconnectDelayMs = 250 }) {
    if (!Impl) throw new TypeError('no WebSocket here: pass one (Node 20 needs --experimental-websocket)');
    this.client = client;
    this.Impl = Impl;
    this.reconnectDelayMs = reconnectDelayMs;
    /** @type {Map<string, { resolve: (v: any) => void, reject: (e: Error) => void }>} */
    this.replies = new Map();
    /** @type {Map<string, Followers & { resolve: (job: Job) => void, done: Promise<Job> }>} */
    this.following = new Map();
    /** @type {Promise<WebSocket> | undefined} */
    this.opening = undefined;
    this.closed = false;
    this.refs = 0;
    /** How many times the socket was reopened after a drop. */
    this.reconnects = 0;
  }

  /**
   * Submits `job` over the socket and follows it to its end.
   * @param {SubmitJob} job
   * @param {Followers & { idempotencyKey?: string }} [options]
   * @returns {Promise<Job>}
   */
  async submit(job, { idempotencyKey, onAccepted, ...followers } = {}) {
    // A key makes a resend after a drop harmless: the gateway answers with the same job.
    const key = idempotencyKey ?? randomKey();
    const reply = await this.call({ op: 'submit', job, idempotency_key: key }, (accepted) => {
      // Registered before the reply is handed back, so no event of the job can be missed.
      if (!isTerminal(accepted.job.status)) this.follow(accepted.job.id, followers);
    });
    const accepted = /** @type {Job} */ (reply.job);
    onAccepted?.(accepted);
    if (isTerminal(accepted.status)) return accepted;
    return /** @type {Promise<Job>} */ (this.following.get(accepted.id)?.done);
  }

  /**
   * Stops a job (one this socket follows, or any of the account's) with the socket's `cancel`,
   * and resolves with the job as the cancel ended it: its `output` holds the rows of the shards
   * paid for. A follower of the job still gets their slices, then resolves `canceled`. A socket
   * that cannot open falls back to REST.
   * @param {string} jobId
   * @returns {Promise<Job>}
   */
  async cancel(jobId) {
    let reply;
    try {
      reply = await this.call({ op: 'cancel', job_id: jobId });
    } catch (e) {
      if (e instanceof XpandError) throw e;
      return this.client.jobs.cancel(jobId);
    }
    return /** @type {Job} */ (reply.job);
  }

  /** Closes the socket; jobs still followed stay unresolved. */
  close() {
    this.closed = true;
    this.opening?.then((ws) => ws.close(1000, 'done')).catch(() => {});
  }

  /**
   * @param {string} jobId
   * @param {Followers} followers
   */
  follow(jobId, followers) {
    /** @type {(job: Job) => void} */
    let resolve = () => {};
    /** @type {Promise<Job>} */
    const done = new Promise((r) => { resolve = r; });
    this.following.set(jobId, { ...followers, resolve, done });
  }

  /**
   * Sends one op and waits for its answer (`accepted`, `subscribed`, ... or an `error` frame,
   * which rejects with an XpandError). `before` runs on the answer before anything else does.
   * @param {Record<string, unknown>} op
   * @param {(reply: any) => void} [before]
   */
  async call(op, before) {
    const ws = await this.open();
    const ref = `r${++this.refs}`;
    return new Promise((resolve, reject) => {
      this.replies.set(ref, {
        resolve: (reply) => { before?.(reply); resolve(reply); },
        reject,
      });
      ws.send(JSON.stringify({ ...op, ref }));
    });
  }

  /** @returns {Promise<WebSocket>} */
  open() {
    if (!this.opening) {
      this.opening = this.connect().catch((e) => { this.opening = undefined; throw e; });
    }
    return this.opening;
  }

  /** @returns {Promise<WebSocket>} */
  async connect() {
    const { token } = await this.client.token();
    const url = `${this.client.baseURL.replace(/^http/, 'ws')}/v1/ws?token=${encodeURIComponent(token)}`;
    const ws = new this.Impl(url);
    await new Promise((resolve, reject) => {
      ws.addEventListener('open', resolve, { once: true });
      ws.addEventListener('error', () => reject(new Error('the WebSocket did not open')), { once: true });
    });
    ws.addEventListener('message', (message) => this.receive(JSON.parse(String(message.data))));
    ws.addEventListener('close', (closed) => this.dropped(ws, closed.code, closed.reason));
    return ws;
  }

  /** @param {any} frame */
  receive(frame) {
    const reply = frame.ref ? this.replies.get(frame.ref) : undefined;
    if (reply) {
      this.replies.delete(frame.ref);
      if (frame.event === 'error') {
        const problem = frame.problem ?? {};
        reply.reject(new XpandError(problem.status ?? 400, problem, problem.retry_after));
      } else {
        reply.resolve(frame);
      }
      return;
    }
    const jobId = frame.job_id ?? frame.job?.id;
    const followed = jobId && this.following.get(jobId);
    if (!followed) return;
    if (frame.event === 'partial') followed.onPartial?.(frame.rows, frame.offset, frame.intervals ?? undefined);
    else if (frame.event === 'progress') followed.onProgress?.(frame.shards_done, frame.shards_total);
    else if (isTerminal(frame.event)) {
      this.following.delete(jobId);
      followed.resolve(frame.job);
    }
  }

  /**
   * The socket closed. Unless this side closed it, or the credential is gone (4403: a revoked
   * key; a fresh token would not help), it reopens and re-subscribes what it follows.
   * @param {WebSocket} ws
   * @param {number} code
   * @param {string} reason
   */
  async dropped(ws, code, reason) {
    const lost = new Error(`the WebSocket closed (${code} ${reason})`);
    for (const [ref, waiting] of this.replies) {
      this.replies.delete(ref);
      waiting.reject(lost);
    }
    if (this.closed || code === 4403) return;
    if ((await this.opening?.catch(() => undefined)) === ws) this.opening = undefined;
    // Back off while the gateway is away (up to about 8 s between tries), then re-subscribe.
    for (let attempt = 0; !this.closed && this.opening === undefined; attempt++) {
      await sleep(Math.min(this.reconnectDelayMs * 2 ** attempt, 8000));
      await this.open().catch(() => undefined);
    }
    this.reconnects++;
    for (const jobId of [...this.following.keys()]) {
      const reply = await this.call({ op: 'subscribe', job_id: jobId }).catch(() => undefined);
      // A failed re-subscribe means the socket dropped again: that drop starts over.
      if (!reply) return;
      const job = /** @type {Job} */ (reply.job);
      const followed = this.following.get(jobId);
      if (followed && isTerminal(job.status)) {
        this.following.delete(jobId);
        followed.resolve(job);
      }
    }
  }
}

/**
 * A response's JSON, or for a body that is not JSON (a proxy's error page) a problem that
 * quotes its start.
 * @param {Response} response
 */
async function readBody(response) {
  const text = await response.text();
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch {
    return { status: response.status, title: response.statusText, detail: text.slice(0, 200) };
  }
}

/** @param {string | undefined} status */
function isTerminal(status) {
  return status === 'succeeded' || status === 'failed' || status === 'canceled';
}

function randomKey() {
  return `js-${globalThis.crypto.randomUUID()}`;
}

/** @param {number} ms */
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
