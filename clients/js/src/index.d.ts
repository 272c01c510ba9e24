/** A refusal or failure the gateway explained with an RFC 9457 problem document. */
export class XpandError extends Error {
    /**
     * @param {number} status
     * @param {Partial<Problem>} problem
     * @param {number | undefined} retryAfter seconds, from `Retry-After` or the problem
     */
    constructor(status: number, problem: Partial<Problem>, retryAfter: number | undefined);
    status: number;
    /** The problem's stable `type` URI. */
    type: string | undefined;
    /** For validation problems: each offending field (a cell is `input.series[3][5]`). */
    errors: {
        column?: number | null;
        detail: string;
        field: string;
        row?: number | null;
    }[];
    retryAfter: number | undefined;
    problem: Partial<{
        available?: number | null;
        detail: string;
        errors?: import("./openapi.js").components["schemas"]["FieldError"][];
        quote?: number | null;
        retry_after?: number | null;
        status: number;
        title: string;
        type: string;
    }>;
}
/** REST access to one gateway with one credential (an API key on servers, a token in browsers). */
export class Xpand {
    /**
     * @param {{ baseURL: string, apiKey?: string, token?: string, maxRetries?: number,
     *           fetch?: typeof fetch }} options
     */
    constructor({ baseURL, apiKey, token, maxRetries, fetch }: {
        baseURL: string;
        apiKey?: string;
        token?: string;
        maxRetries?: number;
        fetch?: typeof globalThis.fetch;
    });
    baseURL: string;
    credential: string;
    maxRetries: number;
    fetch: (input: RequestInfo | URL, init?: RequestInit | undefined) => Promise<Response>;
    jobs: Jobs;
    /**
     * One call. A 429 or 502–504 is retried after its `Retry-After` (or a short back-off) when
     * repeating cannot do anything twice: reads, deletes, and posts with an `Idempotency-Key`.
     * @param {string} method
     * @param {string} path
     * @param {{ body?: unknown, headers?: Record<string, string>, retry?: boolean }} [options]
     * @returns {Promise<{ body: any, headers: Headers, status: number }>}
     */
    request(method: string, path: string, { body, headers, retry }?: {
        body?: unknown;
        headers?: Record<string, string>;
        retry?: boolean;
    }): Promise<{
        body: any;
        headers: Headers;
        status: number;
    }>;
    /**
     * A short-lived token for this API key, for a browser or a WebSocket URL.
     * @param {TokenOptions} [options]
     * @returns {Promise<TokenResponse>}
     */
    token({ scopes, ttlSeconds }?: TokenOptions): Promise<TokenResponse>;
    /** @returns {Promise<Account>} available and held balances, in micro-credits */
    account(): Promise<Account>;
    /**
     * A WebSocket for many jobs at once. It opens on first use with a fresh token (an API key
     * never travels in a URL) and reopens after a drop.
     * @param {{ WebSocket?: typeof WebSocket, reconnectDelayMs?: number }} [options]
     */
    socket(options?: {
        WebSocket?: typeof WebSocket;
        reconnectDelayMs?: number;
    }): JobSocket;
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
    constructor(client: Xpand, { WebSocket: Impl, reconnectDelayMs }: {
        WebSocket?: typeof WebSocket;
        reconnectDelayMs?: number;
    });
    client: Xpand;
    Impl: {
        new (url: string | URL, protocols?: string | string[]): WebSocket;
        prototype: WebSocket;
        readonly CONNECTING: 0;
        readonly OPEN: 1;
        readonly CLOSING: 2;
        readonly CLOSED: 3;
    };
    reconnectDelayMs: number;
    /** @type {Map<string, { resolve: (v: any) => void, reject: (e: Error) => void }>} */
    replies: Map<string, {
        resolve: (v: any) => void;
        reject: (e: Error) => void;
    }>;
    /** @type {Map<string, Followers & { resolve: (job: Job) => void, done: Promise<Job> }>} */
    following: Map<string, Followers & {
        resolve: (job: Job) => void;
        done: Promise<Job>;
    }>;
    /** @type {Promise<WebSocket> | undefined} */
    opening: Promise<WebSocket> | undefined;
    closed: boolean;
    refs: number;
    /** How many times the socket was reopened after a drop. */
    reconnects: number;
    /**
     * Submits `job` over the socket and follows it to its end.
     * @param {SubmitJob} job
     * @param {Followers & { idempotencyKey?: string }} [options]
     * @returns {Promise<Job>}
     */
    submit(job: SubmitJob, { idempotencyKey, onAccepted, ...followers }?: Followers & {
        idempotencyKey?: string;
    }): Promise<Job>;
    /**
     * Stops a job (one this socket follows, or any of the account's) with the socket's `cancel`,
     * and resolves with the job as the cancel ended it: its `output` holds the rows of the shards
     * paid for. A follower of the job still gets their slices, then resolves `canceled`. A socket
     * that cannot open falls back to REST.
     * @param {string} jobId
     * @returns {Promise<Job>}
     */
    cancel(jobId: string): Promise<Job>;
    /** Closes the socket; jobs still followed stay unresolved. */
    close(): void;
    /**
     * @param {string} jobId
     * @param {Followers} followers
     */
    follow(jobId: string, followers: Followers): void;
    /**
     * Sends one op and waits for its answer (`accepted`, `subscribed`, ... or an `error` frame,
     * which rejects with an XpandError). `before` runs on the answer before anything else does.
     * @param {Record<string, unknown>} op
     * @param {(reply: any) => void} [before]
     */
    call(op: Record<string, unknown>, before?: (reply: any) => void): Promise<any>;
    /** @returns {Promise<WebSocket>} */
    open(): Promise<WebSocket>;
    /** @returns {Promise<WebSocket>} */
    connect(): Promise<WebSocket>;
    /** @param {any} frame */
    receive(frame: any): void;
    /**
     * The socket closed. Unless this side closed it, or the credential is gone (4403: a revoked
     * key; a fresh token would not help), it reopens and re-subscribes what it follows.
     * @param {WebSocket} ws
     * @param {number} code
     * @param {string} reason
     */
    dropped(ws: WebSocket, code: number, reason: string): Promise<void>;
}
export type Schemas = import("./openapi.js").components["schemas"];
export type Job = Schemas["Job"];
export type JobPage = Schemas["JobPage"];
export type Account = Schemas["Account"];
export type TokenResponse = Schemas["TokenResponse"];
export type Problem = Schemas["Problem"];
/**
 * What `POST /v1/jobs` takes: one shape per kind (`ForecastJob`, `AnonymizeJob`), each with its
 * kind's own `input` and `params`.
 */
export type SubmitJob = Schemas["SubmitJob"];
export type TokenOptions = {
    scopes?: Schemas["Scope"][];
    ttlSeconds?: number;
};
/**
 * What a job followed over the socket reports.
 */
export type Followers = {
    onAccepted?: (job: Job) => void;
    onPartial?: (rows: number[][], offset: number, intervals?: IntervalRows[]) => void;
    onProgress?: (done: number, total: number) => void;
};
/**
 * One level's bounds around a slice of forecast rows (`params.level`).
 */
export type IntervalRows = Schemas["IntervalRows"];
/** `/v1/jobs`. */
declare class Jobs {
    /** @param {Xpand} client */
    constructor(client: Xpand);
    client: Xpand;
    /**
     * Submits a job. With `idempotencyKey` a retry cannot create or charge twice (and so is
     * retried on 429/503); with `wait` the answer is held until the job ends, up to that many
     * seconds.
     * @param {SubmitJob} job
     * @param {{ idempotencyKey?: string, wait?: number }} [options]
     * @returns {Promise<Job>}
     */
    submit(job: SubmitJob, { idempotencyKey, wait }?: {
        idempotencyKey?: string;
        wait?: number;
    }): Promise<Job>;
    /**
     * The account's jobs, newest first, a page at a time (`next_cursor` continues).
     * @param {{ status?: Job['status'], kind?: string, cursor?: string, limit?: number }} [filter]
     * @returns {Promise<JobPage>}
     */
    list(filter?: {
        status?: Job["status"];
        kind?: string;
        cursor?: string;
        limit?: number;
    }): Promise<JobPage>;
    /** @param {string} id @returns {Promise<Job>} */
    get(id: string): Promise<Job>;
    /**
     * Stops a job: nodes are paid for shards already done, the rest is refunded.
     * @param {string} id @returns {Promise<Job>}
     */
    cancel(id: string): Promise<Job>;
}
export {};
