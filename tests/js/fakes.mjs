// Test doubles for the browser pieces SSEManager depends on.

/** An EventSource that records what was asked of it and lets a test play the server. */
export class FakeEventSource {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSED = 2;

  /** Every instance ever made, oldest first. */
  static instances = [];

  static reset() {
    FakeEventSource.instances = [];
  }

  static get latest() {
    return FakeEventSource.instances.at(-1);
  }

  constructor(url) {
    this.url = url;
    this.readyState = FakeEventSource.CONNECTING;
    this.closed = false;
    this.listeners = new Map();
    FakeEventSource.instances.push(this);
  }

  addEventListener(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
  }

  removeEventListener(type, fn) {
    this.listeners.get(type)?.delete(fn);
  }

  listenerCount() {
    let n = 0;
    for (const set of this.listeners.values()) n += set.size;
    return n;
  }

  close() {
    this.readyState = FakeEventSource.CLOSED;
    this.closed = true;
  }

  _dispatch(type, event) {
    for (const fn of [...(this.listeners.get(type) ?? [])]) fn(event);
  }

  // ---- the "server" side

  open() {
    this.readyState = FakeEventSource.OPEN;
    this._dispatch("open", { type: "open" });
  }

  /** Deliver one named event whose data is `payload` (JSON-encoded unless a string). */
  emit(type, payload, id = "") {
    const data = typeof payload === "string" ? payload : JSON.stringify(payload);
    this._dispatch(type, { type, data, lastEventId: id });
  }

  /** The browser lost the stream and retries by itself. */
  failRetrying() {
    this.readyState = FakeEventSource.CONNECTING;
    this._dispatch("error", { type: "error" });
  }

  /** The browser gave up (non-200 answer, refused connection). */
  failClosed() {
    this.readyState = FakeEventSource.CLOSED;
    this._dispatch("error", { type: "error" });
  }
}

/** setTimeout/clearTimeout on a clock that only moves when the test says so. */
export class FakeTimers {
  constructor() {
    this.now = 0;
    this.nextId = 1;
    this.pending = new Map(); // id -> {at, fn, delay}
  }

  setTimeout = (fn, delay) => {
    const id = this.nextId++;
    this.pending.set(id, { at: this.now + delay, fn, delay });
    return id;
  };

  clearTimeout = (id) => {
    this.pending.delete(id);
  };

  /** Delays of the timers still waiting, in the order they were set. */
  get delays() {
    return [...this.pending.values()].map((t) => t.delay);
  }

  /** Move the clock forward, firing due timers in order. */
  advance(ms) {
    const until = this.now + ms;
    for (;;) {
      const due = [...this.pending.entries()]
        .filter(([, t]) => t.at <= until)
        .sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      const [id, timer] = due;
      this.pending.delete(id);
      this.now = timer.at;
      timer.fn();
    }
    this.now = until;
  }
}

/** Callbacks that remember what they were called with. */
export function recorder() {
  const calls = { progress: [], complete: [], error: [] };
  return {
    calls,
    callbacks: {
      onProgress: (d) => calls.progress.push(d),
      onComplete: (d) => calls.complete.push(d),
      onError: (d) => calls.error.push(d),
    },
  };
}

/**
 * navigator.locks as the page sees it (exclusive locks only): a request waits
 * in line behind the holder; its callback's promise holds the lock; aborting
 * the signal withdraws a request still in line.
 */
export class FakeLockManager {
  constructor() {
    this.lines = new Map(); // name -> requests, the holder first
  }

  request(name, { signal }, callback) {
    return new Promise((resolve, reject) => {
      const line = this.lines.get(name) ?? [];
      this.lines.set(name, line);
      const request = { callback, resolve, held: false };
      line.push(request);
      signal?.addEventListener("abort", () => {
        if (request.held || !line.includes(request)) return;
        line.splice(line.indexOf(request), 1);
        reject(new DOMException("aborted", "AbortError"));
      });
      if (line.length === 1) this._grant(name);
    });
  }

  /** Names of the locks held now. */
  held() {
    return [...this.lines].filter(([, line]) => line[0]?.held).map(([name]) => name);
  }

  _grant(name) {
    const request = this.lines.get(name)[0];
    if (!request) return;
    request.held = true;
    Promise.resolve(request.callback()).then((value) => {
      this.lines.get(name).shift();
      request.resolve(value);
      this._grant(name);
    });
  }
}
