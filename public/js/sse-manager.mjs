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
// EventSource cannot see why a connection failed: a 404 (the daemon forgot the
// task, e.g. after the laptop slept past its retention) looks like a daemon
// that is away. So each time the browser gives up, `GET tasks/<id>` asks; a
// 404 ends the subscription at once as `unknown_task` instead of a minute of
// reconnects ending in "Lost the connection".
//
// Over HTTP/1.x a browser opens at most 6 connections to a site, and every
// open EventSource holds one: a page following 6 tasks has none left for
// POST generate, Cancel or an image, which then wait until a task ends. So
// at most `maxStreams` streams are open at once (4 over HTTP/1.x, no limit
// over HTTP/2 or 3, which multiplex); later subscriptions wait their turn,
// first come first served, and get the task's current snapshot once admitted.
// Meanwhile `GET tasks/<id>` every `waitPollMs` (5 s) shows the task as it is
// (a short request, not a held connection), and a task that ends while it
// waits is delivered as ended without ever taking a stream. Those 6
// connections are the browser's, shared by every tab of the site: so the
// slots are too, as Web Locks (`lockSlots`), where the page has them (a
// secure context: https, localhost); elsewhere each tab counts its own.
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

/** Error codes used when the client, not the server, ends a subscription. */
export const CONNECTION_LOST = "connection_lost";
export const UNKNOWN_TASK = "unknown_task";

export const DEFAULT_OPTIONS = Object.freeze({
  baseUrl: "", // relative to the page, so a reverse-proxy sub-path keeps working
  initialDelayMs: 1000,
  maxDelayMs: 30000,
  maxAttempts: 6, // about a minute of trying (1+2+4+8+16+30 s before jitter)
  waitPollMs: 5000, // how often a subscription waiting for a stream asks for its task
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

/** Streams open at once over HTTP/1.x: 2 of the browser's 6 connections stay free. */
export const HTTP1_MAX_STREAMS = 4;

/**
 * How many streams this page may hold open: unlimited when it came over a
 * protocol that multiplexes (HTTP/2, HTTP/3), else HTTP1_MAX_STREAMS.
 */
export function defaultMaxStreams(performance = globalThis.performance) {
  const navigation = performance?.getEntriesByType?.("navigation")?.[0];
  const protocol = navigation?.nextHopProtocol ?? "";
  return protocol === "h2" || protocol === "h3" ? Infinity : HTTP1_MAX_STREAMS;
}

/**
 * Stream slots shared by every tab of this origin: slot i is the Web Lock
 * `<prefix><i>`, held while a stream is open. A subscription asks for every
 * slot at once and keeps the first it gets (the others go back at once), so a
 * slot freed in any tab goes to whoever asked for it first.
 * `acquire(signal)` resolves with a function that releases the slot; aborting
 * `signal` withdraws a wait.
 */
export function lockSlots(locks, count, prefix = "comfy-progress:stream-slot:") {
  return {
    acquire(signal) {
      return new Promise((resolve) => {
        const asking = new AbortController();
        signal.addEventListener("abort", () => asking.abort(), { once: true });
        let won = false;
        for (let i = 0; i < count; i++) {
          locks
            .request(`${prefix}${i}`, { signal: asking.signal }, () => {
              if (won) return undefined; // another slot came first: this one goes back
              won = true;
              asking.abort(); // withdraw the other requests (a held lock stays held)
              return new Promise((release) => resolve(release));
            })
            .catch(() => {}); // withdrawn
        }
      });
    },
  };
}

/** The stream URL for a task, relative unless `baseUrl` says otherwise. */
export function progressUrl(baseUrl, taskId, lastEventId) {
  let url = `${baseUrl}progress/${encodeURIComponent(taskId)}`;
  if (lastEventId !== null && lastEventId !== "") {
    url += `?lastEventId=${encodeURIComponent(lastEventId)}`;
  }
  return url;
}

/** The task's status URL (`GET` answers 404 once the daemon forgot the task). */
export function taskUrl(baseUrl, taskId) {
  return `${baseUrl}tasks/${encodeURIComponent(taskId)}`;
}

/**
 * Whether an answer to `GET tasks/<id>` is the daemon's own "unknown task": its
 * JSON 404 names the task (a proxy's or a wrong sub-path's 404 does not).
 */
function daemonForgot(taskId, status, body) {
  return status === 404 && body?.error?.details?.taskId === taskId;
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
   * @param {typeof fetch} [options.fetch] asks whether the daemon still knows a task
   * @param {string} [options.baseUrl] prefix for `progress/<id>`; "" = relative to the page
   * @param {number} [options.initialDelayMs]
   * @param {number} [options.maxDelayMs]
   * @param {number} [options.maxAttempts] reconnects in a row without an `open` before giving up
   * @param {number} [options.maxStreams] streams open at once (default: defaultMaxStreams())
   * @param {number} [options.waitPollMs] how often a waiting subscription asks for its task
   * @param {{acquire: Function} | null} [options.slots] slots shared with other tabs
   *   (default: `lockSlots` on navigator.locks when streams are limited; null: none)
   */
  constructor(options = {}) {
    this._EventSource = options.EventSource ?? null;
    this._timers = options.timers ?? {
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (id) => globalThis.clearTimeout(id),
    };
    this._random = options.random ?? Math.random;
    this._logger = options.logger ?? console;
    this._fetch = options.fetch ?? ((url, init) => globalThis.fetch(url, init));
    this._config = {
      baseUrl: options.baseUrl ?? DEFAULT_OPTIONS.baseUrl,
      initialDelayMs: options.initialDelayMs ?? DEFAULT_OPTIONS.initialDelayMs,
      maxDelayMs: options.maxDelayMs ?? DEFAULT_OPTIONS.maxDelayMs,
      maxAttempts: options.maxAttempts ?? DEFAULT_OPTIONS.maxAttempts,
      maxStreams: options.maxStreams ?? defaultMaxStreams(),
      waitPollMs: options.waitPollMs ?? DEFAULT_OPTIONS.waitPollMs,
    };
    const locks = globalThis.navigator?.locks;
    this._slots =
      options.slots !== undefined
        ? options.slots
        : Number.isFinite(this._config.maxStreams) && locks
          ? lockSlots(locks, this._config.maxStreams)
          : null;
    /** @type {Map<string, object>} taskId -> {eventSource, callbacks, lastEventId, attempts, retryTimer, pollTimer, polled, detach, admitted, streaming, slotWait, releaseSlot} */
    this.activeConnections = new Map();
    /** Subscriptions that wait for a stream slot, oldest first. */
    this._waiting = [];
    /** Subscriptions holding a slot (connected, connecting or waiting to reconnect). */
    this._admitted = 0;
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
        pollTimer: null,
        polled: null, // the last snapshot GET tasks/<id> showed, as JSON text
        detach: null,
        admitted: false, // holds one of this tab's maxStreams
        streaming: false, // and its stream is open or being opened
        slotWait: null, // waiting for a slot shared with other tabs: its AbortController
        releaseSlot: null,
      });
      this._waiting.push(taskId);
      this._admitWaiting();
      const entry = this.activeConnections.get(taskId);
      if (entry && !entry.streaming) this._pollWaiting(taskId, entry);
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

  /** Whether a task's stream is open or being opened, not waiting for a slot. */
  isStreaming(taskId) {
    return this.activeConnections.get(taskId)?.streaming ?? false;
  }

  /** Give free slots to waiting subscriptions, oldest first. */
  _admitWaiting() {
    while (this._admitted < this._config.maxStreams && this._waiting.length > 0) {
      const taskId = this._waiting.shift();
      const entry = this.activeConnections.get(taskId);
      if (!entry) continue;
      entry.admitted = true;
      this._admitted += 1;
      this._takeSlot(taskId, entry);
    }
  }

  /** Open the stream once a slot shared with the other tabs is ours (at once without them). */
  _takeSlot(taskId, entry) {
    if (this._slots === null) {
      this._stream(taskId, entry);
      return;
    }
    const wait = new AbortController();
    entry.slotWait = wait;
    this._slots.acquire(wait.signal).then((release) => {
      if (this.activeConnections.get(taskId) !== entry) {
        release(); // ended while it waited
        return;
      }
      entry.slotWait = null;
      entry.releaseSlot = release;
      this._stream(taskId, entry);
    });
  }

  _stream(taskId, entry) {
    entry.streaming = true;
    this._stopPolling(entry);
    this._connect(taskId);
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
    this._route(taskId, entry, event.type, data);
  }

  /** Hand a message to the task's callbacks; terminal ones end the subscription first. */
  _route(taskId, entry, type, data) {
    const { callbacks } = entry;
    if (type === EVENT_PROGRESS) {
      callbacks.onProgress(data);
    } else if (type === EVENT_COMPLETE) {
      // Clean up before calling out, so the callback may subscribe anew.
      this._cleanup(taskId);
      callbacks.onComplete(data);
    } else if (type === EVENT_ERROR) {
      this._cleanup(taskId);
      callbacks.onError(data);
    }
  }

  /** Waiting for a stream: show the task's snapshot now, and again every waitPollMs. */
  _pollWaiting(taskId, entry) {
    entry.pollTimer = null;
    this._showSnapshot(taskId, entry).finally(() => {
      if (this.activeConnections.get(taskId) !== entry || entry.streaming) return;
      entry.pollTimer = this._timers.setTimeout(
        () => this._pollWaiting(taskId, entry),
        this._config.waitPollMs,
      );
    });
  }

  _stopPolling(entry) {
    if (entry.pollTimer !== null) this._timers.clearTimeout(entry.pollTimer);
    entry.pollTimer = null;
  }

  /** `GET tasks/<id>` for a waiting subscription: routed as the stream would send it. */
  async _showSnapshot(taskId, entry) {
    let response;
    let body;
    try {
      response = await this._fetch(taskUrl(this._config.baseUrl, taskId), {
        headers: { Accept: "application/json" },
      });
      body = await response.json();
    } catch {
      return; // the daemon is away: the stream, once admitted, reconnects as usual
    }
    if (this.activeConnections.get(taskId) !== entry || entry.streaming) return; // the stream has it
    if (daemonForgot(taskId, response.status, body)) {
      this._cleanup(taskId);
      entry.callbacks.onError(this._unknown(taskId, body.error.details.hint));
      return;
    }
    if (response.status !== 200 || body?.taskId !== taskId) return;
    const { version, ...payload } = body;
    // Never older than what was shown; the stream, once admitted, resumes after it.
    // The same version is shown again when it reads otherwise: in shared mode a
    // front adds a task no worker took yet its place in line as it is now.
    if (!Number.isInteger(version)) return;
    const text = JSON.stringify(payload);
    if (entry.lastEventId !== null) {
      const last = Number(entry.lastEventId);
      if (version < last || (version === last && text === entry.polled)) return;
    }
    entry.lastEventId = String(version);
    entry.polled = text;
    const type =
      payload.status === "completed"
        ? EVENT_COMPLETE
        : payload.status === "error"
          ? EVENT_ERROR
          : EVENT_PROGRESS;
    this._route(taskId, entry, type, payload);
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
    this._checkKnown(taskId, entry);
  }

  /** Ask the daemon whether it still knows the task; a 404 ends the subscription. */
  async _checkKnown(taskId, entry) {
    let body;
    try {
      const response = await this._fetch(taskUrl(this._config.baseUrl, taskId), {
        headers: { Accept: "application/json" },
      });
      if (response.status !== 404) return;
      body = await response.json();
    } catch {
      return; // the daemon is away, or the 404 is not its JSON: keep reconnecting
    }
    if (!daemonForgot(taskId, 404, body)) return;
    if (this.activeConnections.get(taskId) !== entry) return; // ended or resubscribed meanwhile
    const { callbacks } = entry;
    this._cleanup(taskId);
    callbacks.onError(this._unknown(taskId, body.error.details.hint));
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

  /** The error-event for a task the daemon no longer knows (it answered 404). */
  _unknown(taskId, hint) {
    return {
      taskId,
      status: "error",
      error: {
        code: UNKNOWN_TASK,
        message: "The server no longer knows this task",
        details: typeof hint === "string" ? hint : `GET tasks/${taskId} answered 404`,
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
    this._stopPolling(entry);
    this._closeEventSource(entry);
    entry.slotWait?.abort();
    entry.releaseSlot?.();
    entry.slotWait = null;
    entry.releaseSlot = null;
    this.activeConnections.delete(taskId);
    if (entry.admitted) {
      this._admitted -= 1;
      this._admitWaiting();
    } else {
      this._waiting = this._waiting.filter((id) => id !== taskId);
    }
  }
}

/** The page-wide instance (the seed's singleton). */
export const sseManager = new SSEManager();
