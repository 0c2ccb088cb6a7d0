// SSEManager: one EventSource per task, JSON routed to per-task callbacks.
//
// The daemon streams `progress`, `complete` and `error-event` events on
// `progress/<taskId>` (the terminal event ends the stream; `id:` is an integer
// version). The browser already reconnects by itself while readyState is
// CONNECTING (it sends `Last-Event-ID` on its own), so we leave it alone then.
// It gives up for good (readyState CLOSED) after a non-200 answer or a failed
// connection; only then do we open a new EventSource, after an exponential,
// capped, jittered delay, resuming with `?lastEventId=` because a new
// EventSource cannot carry headers.
//
// Everything with side effects (EventSource, timers, random) is injected, so
// the schedule is testable without a browser or a clock.

/** EventSource.readyState values (the constructor may be a fake without statics). */
const CONNECTING = 0;
const CLOSED = 2;

/** The SSE event names the daemon sends (DESIGN.md, public contract). */
export const EVENT_PROGRESS = "progress";
export const EVENT_COMPLETE = "complete";
export const EVENT_ERROR = "error-event";
const ROUTED_EVENTS = [EVENT_PROGRESS, EVENT_COMPLETE, EVENT_ERROR];

/** Error code used when the client, not the server, ends a subscription. */
export const CONNECTION_LOST = "connection_lost";

export const DEFAULT_OPTIONS = Object.freeze({
  baseUrl: "", // relative to the page, so a reverse-proxy sub-path keeps working
  initialDelayMs: 1000,
  maxDelayMs: 30000,
  maxAttempts: 6, // about a minute of trying (1+2+4+8+16+30 s before jitter)
});

/**
 * Delay before reconnect attempt `attempt` (1-based): exponential, capped,
 * with "equal jitter": half the capped delay is fixed, half is random. The
 * fixed half keeps a fleet of tabs from hammering a restarting daemon; the
 * random half spreads them out.
 */
export function backoffDelay(attempt, { initialDelayMs, maxDelayMs }, random) {
  const exponential = initialDelayMs * 2 ** Math.max(0, attempt - 1);
  const capped = Math.min(maxDelayMs, exponential);
  return capped / 2 + (random() * capped) / 2;
}

/** The stream URL for a task, relative unless `baseUrl` says otherwise. */
export function progressUrl(baseUrl, taskId, lastEventId) {
  let url = `${baseUrl}progress/${encodeURIComponent(taskId)}`;
  if (lastEventId !== null && lastEventId !== "") {
    url += `?lastEventId=${encodeURIComponent(lastEventId)}`;
  }
  return url;
}

/** Accept the seed's two spellings: an object, or three positional functions. */
function normalizeCallbacks(callbacks, onComplete, onError) {
  const given =
    typeof callbacks === "function"
      ? { onProgress: callbacks, onComplete, onError }
      : callbacks ?? {};
  const noop = () => {};
  return {
    onProgress: given.onProgress ?? noop,
    onComplete: given.onComplete ?? noop,
    onError: given.onError ?? noop,
  };
}

export class SSEManager {
  /**
   * @param {object} [options]
   * @param {typeof EventSource} [options.EventSource] defaults to the browser's, looked up at connect time
   * @param {{setTimeout: Function, clearTimeout: Function}} [options.timers]
   * @param {() => number} [options.random] in [0, 1)
   * @param {{warn: Function}} [options.logger]
   * @param {string} [options.baseUrl] prefix for `progress/<id>`; "" = relative to the page
   * @param {number} [options.initialDelayMs]
   * @param {number} [options.maxDelayMs]
   * @param {number} [options.maxAttempts] reconnects in a row without an `open` before giving up
   */
  constructor(options = {}) {
    this._EventSource = options.EventSource ?? null;
    this._timers = options.timers ?? {
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (id) => globalThis.clearTimeout(id),
    };
    this._random = options.random ?? Math.random;
    this._logger = options.logger ?? console;
    this._config = {
      baseUrl: options.baseUrl ?? DEFAULT_OPTIONS.baseUrl,
      initialDelayMs: options.initialDelayMs ?? DEFAULT_OPTIONS.initialDelayMs,
      maxDelayMs: options.maxDelayMs ?? DEFAULT_OPTIONS.maxDelayMs,
      maxAttempts: options.maxAttempts ?? DEFAULT_OPTIONS.maxAttempts,
    };
    /** @type {Map<string, object>} taskId -> {eventSource, callbacks, lastEventId, attempts, retryTimer, detach} */
    this.activeConnections = new Map();
  }

  /**
   * Follow a task. Subscribing again to a task already followed only swaps
   * the callbacks: one task never has two connections.
   * @returns {() => void} a function that unsubscribes
   */
  subscribe(taskId, callbacks, onComplete, onError) {
    const normalized = normalizeCallbacks(callbacks, onComplete, onError);
    const existing = this.activeConnections.get(taskId);
    if (existing) {
      existing.callbacks = normalized;
    } else {
      this.activeConnections.set(taskId, {
        eventSource: null,
        callbacks: normalized,
        lastEventId: null,
        attempts: 0,
        retryTimer: null,
        detach: null,
      });
      this._connect(taskId);
    }
    return () => this.unsubscribe(taskId);
  }

  /** Stop following a task: close its stream and cancel any pending reconnect. */
  unsubscribe(taskId) {
    this._cleanup(taskId);
  }

  /** Whether a task is followed (connected, connecting or waiting to reconnect). */
  isSubscribed(taskId) {
    return this.activeConnections.has(taskId);
  }

  _connect(taskId) {
    const entry = this.activeConnections.get(taskId);
    if (!entry) return;
    entry.retryTimer = null;
    if (entry.eventSource && entry.eventSource.readyState !== CLOSED) return; // no double connect
    this._closeEventSource(entry);

    const EventSourceImpl = this._EventSource ?? globalThis.EventSource;
    const source = new EventSourceImpl(
      progressUrl(this._config.baseUrl, taskId, entry.lastEventId),
    );
    const onMessage = (event) => this._handleMessage(taskId, event, source);
    const onOpen = () => {
      // A stream is up: the next failure starts the schedule from the beginning.
      if (entry.eventSource === source) entry.attempts = 0;
    };
    const onError = (error) => {
      if (entry.eventSource === source) this._handleError(taskId, error);
    };
    for (const name of ROUTED_EVENTS) source.addEventListener(name, onMessage);
    source.addEventListener("open", onOpen);
    source.addEventListener("error", onError);
    entry.eventSource = source;
    entry.detach = () => {
      for (const name of ROUTED_EVENTS) source.removeEventListener(name, onMessage);
      source.removeEventListener("open", onOpen);
      source.removeEventListener("error", onError);
    };
  }

  /** Parse one event and route it; terminal events end the subscription first. */
  _handleMessage(taskId, event, source) {
    const entry = this.activeConnections.get(taskId);
    if (!entry || (source !== undefined && entry.eventSource !== source)) return;
    if (event.lastEventId) entry.lastEventId = event.lastEventId;

    let data;
    try {
      data = JSON.parse(event.data);
    } catch (err) {
      // One bad frame is not the task's fate: skip it, the next snapshot repairs the view.
      this._logger.warn(`sse-manager: ignoring a malformed ${event.type} event for ${taskId}`, err);
      return;
    }
    const { callbacks } = entry;
    if (event.type === EVENT_PROGRESS) {
      callbacks.onProgress(data);
    } else if (event.type === EVENT_COMPLETE) {
      // Clean up before calling out, so the callback may subscribe anew.
      this._cleanup(taskId);
      callbacks.onComplete(data);
    } else if (event.type === EVENT_ERROR) {
      this._cleanup(taskId);
      callbacks.onError(data);
    }
  }

  /** A connection error: wait while the browser retries; back off once it gave up. */
  _handleError(taskId, _error) {
    const entry = this.activeConnections.get(taskId);
    if (!entry || !entry.eventSource) return;
    if (entry.eventSource.readyState === CONNECTING) return; // the browser is retrying

    // CLOSED: the browser will not try again (non-200 answer or failed connection).
    this._closeEventSource(entry);
    entry.attempts += 1;
    if (entry.attempts > this._config.maxAttempts) {
      const { callbacks } = entry;
      this._cleanup(taskId);
      callbacks.onError(this._gaveUp(taskId, entry.attempts - 1));
      return;
    }
    const delay = backoffDelay(entry.attempts, this._config, this._random);
    entry.retryTimer = this._timers.setTimeout(() => this._connect(taskId), delay);
  }

  /** A client-made message in the daemon's error-event shape, so callers read one format. */
  _gaveUp(taskId, reconnects) {
    return {
      taskId,
      status: "error",
      error: {
        code: CONNECTION_LOST,
        message: "Lost the connection to the progress stream",
        details: `gave up after ${reconnects} reconnect attempts`,
      },
      timestamp: new Date().toISOString(),
    };
  }

  _closeEventSource(entry) {
    if (entry.detach) entry.detach();
    if (entry.eventSource) entry.eventSource.close();
    entry.detach = null;
    entry.eventSource = null;
  }

  /** Forget a task: close its EventSource, cancel a pending reconnect. */
  _cleanup(taskId) {
    const entry = this.activeConnections.get(taskId);
    if (!entry) return;
    if (entry.retryTimer !== null) this._timers.clearTimeout(entry.retryTimer);
    entry.retryTimer = null;
    this._closeEventSource(entry);
    this.activeConnections.delete(taskId);
  }
}

/** The page-wide instance (the seed's singleton). */
export const sseManager = new SSEManager();
