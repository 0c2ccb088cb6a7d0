import assert from "node:assert/strict";
import { beforeEach, describe, test } from "node:test";

import {
  CONNECTION_LOST,
  HTTP1_MAX_STREAMS,
  SSEManager,
  UNKNOWN_TASK,
  backoffDelay,
  defaultMaxStreams,
  lockSlots,
  progressUrl,
  sseManager,
} from "../../public/js/sse-manager.mjs";
import { FakeEventSource, FakeLockManager, FakeTimers, recorder } from "./fakes.mjs";

// Payloads shaped like protocol/task.py `render` output.
const PROGRESS = {
  taskId: "t1",
  status: "in-progress",
  phase: "running",
  progress: {
    percentage: 45,
    currentStep: "Sampling image...",
    currentValue: 9,
    maxValue: 20,
    overall: { percentage: 63.2, nodesDone: 4, nodesTotal: 7 },
    etaSeconds: 3.3,
    node: "3",
    nodeType: "KSampler",
  },
  queue: null,
  timestamp: "2025-11-25T12:34:56.789Z",
};
const COMPLETE = {
  taskId: "t1",
  status: "completed",
  progress: { percentage: 100, currentStep: "Complete", currentValue: 20, maxValue: 20 },
  result: { imageUrl: "/image/a.png", imageUrls: ["/image/a.png"], prompt: "a cat", seed: 1 },
  timestamp: "2025-11-25T12:35:30.123Z",
};
const ERROR = {
  taskId: "t1",
  status: "error",
  progress: { percentage: 0, currentStep: "Failed", currentValue: 0, maxValue: 0 },
  error: { message: "CUDA out of memory", details: "RuntimeError in node 3 (KSampler)", code: "comfy_error" },
  timestamp: "2025-11-25T12:35:30.123Z",
};

let timers;
let manager;
const RANDOM = 0.5;

/** A fetch answering every request with `status` and `body`, recording the URLs asked. */
function fakeFetch(status, body) {
  const urls = [];
  const impl = async (url) => {
    urls.push(url);
    return new Response(JSON.stringify(body), { status });
  };
  return { impl, urls };
}

/** Let the manager's pending fetch answers run (no time passes). */
const answered = () => new Promise((resolve) => setImmediate(resolve));

function makeManager(options = {}) {
  return new SSEManager({
    EventSource: FakeEventSource,
    timers,
    random: () => RANDOM,
    logger: { warn: () => {} },
    fetch: fakeFetch(200, { taskId: "t1", status: "in-progress" }).impl, // the daemon knows it
    ...options,
  });
}

beforeEach(() => {
  FakeEventSource.reset();
  timers = new FakeTimers();
  manager = makeManager();
});

describe("connecting", () => {
  test("opens one EventSource on a relative URL with the task id escaped", () => {
    manager.subscribe("a b/c", {});
    assert.equal(FakeEventSource.instances.length, 1);
    assert.equal(FakeEventSource.latest.url, "progress/a%20b%2Fc");
    assert.ok(manager.isSubscribed("a b/c"));
  });

  test("a base URL prefixes the path", () => {
    makeManager({ baseUrl: "/app/" }).subscribe("t1", {});
    assert.equal(FakeEventSource.latest.url, "/app/progress/t1");
  });

  test("subscribing twice to one task keeps one connection and uses the newer callbacks", () => {
    const first = recorder();
    const second = recorder();
    manager.subscribe("t1", first.callbacks);
    manager.subscribe("t1", second.callbacks);
    assert.equal(FakeEventSource.instances.length, 1);
    FakeEventSource.latest.emit("progress", PROGRESS, "1");
    assert.equal(first.calls.progress.length, 0);
    assert.equal(second.calls.progress.length, 1);
  });

  test("tasks get their own EventSource each", () => {
    manager.subscribe("t1", {});
    manager.subscribe("t2", {});
    assert.deepEqual(
      FakeEventSource.instances.map((s) => s.url),
      ["progress/t1", "progress/t2"],
    );
  });

  test("the seed's positional callbacks work too", () => {
    const got = [];
    manager.subscribe("t1", (d) => got.push(["p", d]), (d) => got.push(["c", d]));
    FakeEventSource.latest.emit("progress", PROGRESS, "1");
    FakeEventSource.latest.emit("complete", COMPLETE, "2");
    assert.deepEqual(got, [["p", PROGRESS], ["c", COMPLETE]]);
  });
});

describe("routing", () => {
  test("progress goes to onProgress, parsed, and keeps the stream open", () => {
    const { calls, callbacks } = recorder();
    manager.subscribe("t1", callbacks);
    const source = FakeEventSource.latest;
    source.open();
    source.emit("progress", PROGRESS, "1");
    source.emit("progress", { ...PROGRESS, progress: { ...PROGRESS.progress, currentValue: 10 } }, "2");
    assert.deepEqual(calls.progress[0], PROGRESS);
    assert.equal(calls.progress[1].progress.currentValue, 10);
    assert.equal(calls.complete.length + calls.error.length, 0);
    assert.equal(source.closed, false);
    assert.ok(manager.isSubscribed("t1"));
  });

  test("complete goes to onComplete, then the EventSource is closed and forgotten", () => {
    const { calls, callbacks } = recorder();
    manager.subscribe("t1", callbacks);
    const source = FakeEventSource.latest;
    source.emit("complete", COMPLETE, "5");
    assert.deepEqual(calls.complete, [COMPLETE]);
    assert.equal(source.closed, true);
    assert.equal(source.listenerCount(), 0);
    assert.equal(manager.isSubscribed("t1"), false);
  });

  test("error-event goes to onError with the server's message, then cleanup", () => {
    const { calls, callbacks } = recorder();
    manager.subscribe("t1", callbacks);
    const source = FakeEventSource.latest;
    source.emit("error-event", ERROR, "5");
    assert.equal(calls.error.length, 1);
    assert.equal(calls.error[0].error.message, "CUDA out of memory");
    assert.equal(source.closed, true);
    assert.equal(manager.isSubscribed("t1"), false);
  });

  test("a terminal callback may subscribe to the same task again", () => {
    let reopened = false;
    manager.subscribe("t1", {
      onComplete: () => {
        manager.subscribe("t1", {});
        reopened = true;
      },
    });
    FakeEventSource.latest.emit("complete", COMPLETE, "5");
    assert.ok(reopened);
    assert.equal(FakeEventSource.instances.length, 2);
    assert.ok(manager.isSubscribed("t1"));
  });

  test("a malformed event is skipped and later events still arrive", () => {
    const warnings = [];
    manager = makeManager({ logger: { warn: (msg) => warnings.push(msg) } });
    const { calls, callbacks } = recorder();
    manager.subscribe("t1", callbacks);
    FakeEventSource.latest.emit("progress", "{not json", "1");
    FakeEventSource.latest.emit("progress", PROGRESS, "2");
    assert.equal(calls.progress.length, 1);
    assert.equal(calls.error.length, 0);
    assert.equal(warnings.length, 1);
  });

  test("events from one task never reach another task's callbacks", () => {
    const one = recorder();
    const two = recorder();
    manager.subscribe("t1", one.callbacks);
    manager.subscribe("t2", two.callbacks);
    FakeEventSource.instances[1].emit("progress", { ...PROGRESS, taskId: "t2" }, "1");
    assert.equal(one.calls.progress.length, 0);
    assert.equal(two.calls.progress.length, 1);
  });
});

describe("unsubscribe", () => {
  test("closes the EventSource, drops the listeners and silences callbacks", () => {
    const { calls, callbacks } = recorder();
    manager.subscribe("t1", callbacks);
    const source = FakeEventSource.latest;
    manager.unsubscribe("t1");
    assert.equal(source.closed, true);
    assert.equal(source.listenerCount(), 0);
    assert.equal(manager.isSubscribed("t1"), false);
    // A late event dispatched by a browser that had it queued is ignored.
    manager._handleMessage("t1", { type: "progress", data: JSON.stringify(PROGRESS), lastEventId: "9" });
    assert.equal(calls.progress.length, 0);
  });

  test("the function subscribe returns unsubscribes", () => {
    const off = manager.subscribe("t1", {});
    off();
    assert.equal(FakeEventSource.latest.closed, true);
    assert.equal(manager.isSubscribed("t1"), false);
  });

  test("cancels a pending reconnect", () => {
    manager.subscribe("t1", {});
    FakeEventSource.latest.failClosed();
    assert.equal(timers.pending.size, 1);
    manager.unsubscribe("t1");
    assert.equal(timers.pending.size, 0);
    timers.advance(60_000);
    assert.equal(FakeEventSource.instances.length, 1);
  });

  test("unknown task ids are a no-op", () => {
    manager.unsubscribe("nope");
    assert.equal(manager.activeConnections.size, 0);
  });
});

describe("reconnecting", () => {
  test("while the browser retries (CONNECTING) nothing new is opened", () => {
    const { calls, callbacks } = recorder();
    manager.subscribe("t1", callbacks);
    const source = FakeEventSource.latest;
    source.failRetrying();
    source.failRetrying();
    timers.advance(120_000);
    assert.equal(FakeEventSource.instances.length, 1);
    assert.equal(source.closed, false);
    assert.equal(timers.pending.size, 0);
    assert.equal(calls.error.length, 0);
  });

  test("after the browser gives up, one new EventSource resumes from the last id", () => {
    manager.subscribe("t1", {});
    const first = FakeEventSource.latest;
    first.open();
    first.emit("progress", PROGRESS, "7");
    first.failClosed();
    assert.equal(first.closed, true);
    assert.equal(first.listenerCount(), 0);
    assert.equal(FakeEventSource.instances.length, 1, "waits before reconnecting");
    timers.advance(timers.delays[0]);
    assert.equal(FakeEventSource.instances.length, 2);
    assert.equal(FakeEventSource.latest.url, "progress/t1?lastEventId=7");
  });

  test("without any event yet, the reconnect URL has no lastEventId", () => {
    manager.subscribe("t1", {});
    FakeEventSource.latest.failClosed();
    timers.advance(60_000);
    assert.equal(FakeEventSource.latest.url, "progress/t1");
  });

  test("the delays double, are capped, and carry the injected jitter", () => {
    manager = makeManager({ initialDelayMs: 1000, maxDelayMs: 5000, maxAttempts: 10 });
    manager.subscribe("t1", {});
    const delays = [];
    for (let i = 0; i < 5; i++) {
      FakeEventSource.latest.failClosed();
      delays.push(timers.delays[0]);
      timers.advance(timers.delays[0]);
    }
    // random() = 0.5: half fixed + a quarter of the capped delay.
    assert.deepEqual(delays, [750, 1500, 3000, 3750, 3750]);
  });

  test("jitter spans [half, whole] of the capped delay", () => {
    const config = { initialDelayMs: 1000, maxDelayMs: 30000 };
    assert.equal(backoffDelay(1, config, () => 0), 500);
    assert.equal(backoffDelay(1, config, () => 0.999999), 999.9995);
    assert.equal(backoffDelay(3, config, () => 0), 2000);
    assert.equal(backoffDelay(10, config, () => 0), 15000);
    assert.equal(backoffDelay(10, config, () => 1), 30000);
  });

  test("a reconnect that opens resets the schedule", () => {
    manager.subscribe("t1", {});
    FakeEventSource.latest.failClosed();
    timers.advance(timers.delays[0]);
    FakeEventSource.latest.failClosed();
    assert.equal(timers.delays[0], 1500, "second attempt doubles");
    timers.advance(timers.delays[0]);
    FakeEventSource.latest.open();
    FakeEventSource.latest.failClosed();
    assert.equal(timers.delays[0], 750, "after an open, back to the first delay");
  });

  test("the id of the last event wins over older ones when resuming", () => {
    manager.subscribe("t1", {});
    const s = FakeEventSource.latest;
    s.emit("progress", PROGRESS, "3");
    s.emit("progress", PROGRESS, "4");
    s.emit("progress", PROGRESS, ""); // no id: what we resume from stays "4"
    s.failClosed();
    timers.advance(60_000);
    assert.equal(FakeEventSource.latest.url, "progress/t1?lastEventId=4");
  });

  test("gives up after maxAttempts failed reconnects and says so through onError", () => {
    manager = makeManager({ maxAttempts: 3 });
    const { calls, callbacks } = recorder();
    manager.subscribe("t1", callbacks);
    FakeEventSource.latest.failClosed(); // the first connection fails
    for (let i = 0; i < 3; i++) {
      timers.advance(timers.delays[0]);
      FakeEventSource.latest.failClosed();
    }
    assert.equal(FakeEventSource.instances.length, 4, "1 connection + 3 reconnects");
    assert.equal(calls.error.length, 1);
    const [gaveUp] = calls.error;
    assert.equal(gaveUp.taskId, "t1");
    assert.equal(gaveUp.status, "error");
    assert.equal(gaveUp.error.code, CONNECTION_LOST);
    assert.match(gaveUp.error.message, /connection/i);
    assert.match(gaveUp.error.details, /3 reconnect attempts/);
    assert.equal(manager.isSubscribed("t1"), false);
    assert.equal(timers.pending.size, 0);
    timers.advance(600_000);
    assert.equal(FakeEventSource.instances.length, 4, "nothing after giving up");
  });

  test("a task the daemon forgot ends at once, as unknown, in the error-event shape", async () => {
    // E.g. the laptop slept past the task's retention: /progress answers 404,
    // which EventSource cannot tell from a daemon that is away.
    const forgot = fakeFetch(404, {
      error: { message: "unknown task", details: { taskId: "t1", hint: "finished tasks are kept for 300 s" } },
    });
    manager = makeManager({ fetch: forgot.impl, baseUrl: "comfy/" });
    const { calls, callbacks } = recorder();
    manager.subscribe("t1", callbacks);
    FakeEventSource.latest.failClosed();
    await answered();
    assert.deepEqual(forgot.urls, ["comfy/tasks/t1"]);
    assert.equal(calls.error.length, 1);
    const [unknown] = calls.error;
    assert.equal(unknown.taskId, "t1");
    assert.equal(unknown.status, "error");
    assert.equal(unknown.error.code, UNKNOWN_TASK);
    assert.match(unknown.error.message, /no longer knows this task/);
    assert.equal(unknown.error.details, "finished tasks are kept for 300 s");
    assert.equal(typeof unknown.timestamp, "string");
    assert.equal(manager.isSubscribed("t1"), false);
    assert.equal(timers.pending.size, 0, "no reconnect scheduled");
    timers.advance(600_000);
    assert.equal(FakeEventSource.instances.length, 1);
  });

  test("a task the daemon still knows (or a daemon away) keeps the reconnect schedule", async () => {
    const { calls, callbacks } = recorder();
    manager.subscribe("t1", callbacks);
    FakeEventSource.latest.failClosed();
    await answered();
    assert.equal(calls.error.length, 0);
    assert.equal(timers.pending.size, 1);
    timers.advance(timers.delays[0]);
    assert.equal(FakeEventSource.instances.length, 2);

    const away = async () => {
      throw new TypeError("Failed to fetch");
    };
    manager = makeManager({ fetch: away });
    manager.subscribe("t2", callbacks);
    FakeEventSource.latest.failClosed();
    await answered();
    assert.equal(calls.error.length, 0);
    assert.equal(manager.isSubscribed("t2"), true);

    for (const notOurs of ["<h1>Not Found</h1>", '{"error": {"message": "not found"}}']) {
      const proxy404 = async () => new Response(notOurs, { status: 404 });
      manager = makeManager({ fetch: proxy404 });
      manager.subscribe("t3", callbacks);
      FakeEventSource.latest.failClosed();
      await answered();
      assert.equal(calls.error.length, 0, "only the daemon's own 404 means unknown");
      assert.equal(manager.isSubscribed("t3"), true);
    }
  });

  test("a terminal event after a resume still ends the subscription", () => {
    const { calls, callbacks } = recorder();
    manager.subscribe("t1", callbacks);
    FakeEventSource.latest.emit("progress", PROGRESS, "1");
    FakeEventSource.latest.failClosed();
    timers.advance(timers.delays[0]);
    FakeEventSource.latest.open();
    FakeEventSource.latest.emit("complete", COMPLETE, "2");
    assert.equal(calls.complete.length, 1);
    assert.equal(FakeEventSource.latest.closed, true);
    assert.equal(manager.isSubscribed("t1"), false);
  });
});

describe("stream slots", () => {
  // Over HTTP/1.1 a browser holds at most 6 connections per site: with one
  // EventSource per task, a 7th request (POST generate, Cancel, an image)
  // waited until some task ended.
  const openUrls = () =>
    FakeEventSource.instances.filter((s) => !s.closed).map((s) => s.url);

  test("past maxStreams, subscriptions wait without a connection", () => {
    manager = makeManager({ maxStreams: 2 });
    for (const id of ["t1", "t2", "t3", "t4"]) manager.subscribe(id, {});
    assert.deepEqual(openUrls(), ["progress/t1", "progress/t2"]);
    assert.ok(manager.isSubscribed("t3"));
    assert.equal(manager.isStreaming("t2"), true);
    assert.equal(manager.isStreaming("t3"), false);
  });

  test("a task that ends hands its slot to the oldest waiting one, which gets its events", () => {
    manager = makeManager({ maxStreams: 1 });
    const third = recorder();
    manager.subscribe("t1", {});
    manager.subscribe("t2", {});
    manager.subscribe("t3", third.callbacks);
    FakeEventSource.latest.emit("complete", COMPLETE, "9");
    assert.deepEqual(openUrls(), ["progress/t2"]);
    FakeEventSource.latest.emit("error-event", ERROR, "4");
    assert.deepEqual(openUrls(), ["progress/t3"]);
    FakeEventSource.latest.emit("progress", { ...PROGRESS, taskId: "t3" }, "1");
    assert.equal(third.calls.progress.length, 1);
  });

  test("unsubscribing frees a slot; a waiting subscription leaves the line", () => {
    manager = makeManager({ maxStreams: 1 });
    for (const id of ["t1", "t2", "t3"]) manager.subscribe(id, {});
    manager.unsubscribe("t2"); // waiting: never connects
    manager.unsubscribe("t1");
    assert.deepEqual(openUrls(), ["progress/t3"]);
    assert.equal(FakeEventSource.instances.length, 2);
  });

  test("a stream that gave up frees its slot; one waiting to reconnect keeps it", () => {
    manager = makeManager({ maxStreams: 1, maxAttempts: 1 });
    manager.subscribe("t1", {});
    manager.subscribe("t2", {});
    FakeEventSource.latest.failClosed(); // t1 waits to reconnect: still its slot
    assert.equal(manager.isStreaming("t2"), false);
    timers.advance(timers.delays[0]);
    FakeEventSource.latest.failClosed(); // t1 gives up
    assert.deepEqual(openUrls(), ["progress/t2"]);
  });

  // A task waiting for a slot used to show "Starting..." until one freed,
  // however far it had got (or even after it ended).
  /** A fetch answering `tasks/<id>` with the next of `answers[id]` ([status, body]). */
  function snapshots(answers) {
    const urls = [];
    const impl = async (url) => {
      urls.push(url);
      const id = decodeURIComponent(url.split("/").pop());
      const [status, body] = answers[id].length > 1 ? answers[id].shift() : answers[id][0];
      return new Response(JSON.stringify(body), { status });
    };
    return { impl, urls };
  }

  test("a waiting subscription shows its task from GET tasks/<id>, then resumes after it", async () => {
    const t2 = (version, percentage) => [
      200,
      { ...PROGRESS, taskId: "t2", progress: { ...PROGRESS.progress, percentage }, version },
    ];
    const asked = snapshots({ t2: [t2(3, 10), t2(3, 10), t2(5, 30)] });
    manager = makeManager({ maxStreams: 1, fetch: asked.impl, waitPollMs: 5000 });
    const second = recorder();
    manager.subscribe("t1", {});
    manager.subscribe("t2", second.callbacks);
    await answered();
    assert.deepEqual(asked.urls, ["tasks/t2"]);
    assert.deepEqual(second.calls.progress.map((p) => p.progress.percentage), [10]);
    assert.equal("version" in second.calls.progress[0], false, "the stream's shape: no version");
    timers.advance(5000);
    await answered(); // the same version again: nothing new to show
    timers.advance(5000);
    await answered();
    assert.deepEqual(second.calls.progress.map((p) => p.progress.percentage), [10, 30]);
    FakeEventSource.latest.emit("complete", COMPLETE, "9"); // t1 ends: t2 gets the slot
    assert.deepEqual(openUrls(), ["progress/t2?lastEventId=5"]);
    timers.advance(60000);
    await answered();
    assert.equal(asked.urls.length, 3, "no polling once streaming");
  });

  test("a waiting subscription shows a new place in line under the same version", async () => {
    // A front in shared mode answers GET tasks/<id> of a task no worker took
    // yet with its place in line as it is now, under the version the task was
    // queued with: the banner kept the first place it was told.
    const queued = (ahead) => [
      200,
      {
        taskId: "t2",
        status: "in-progress",
        phase: "queued",
        progress: { percentage: 0, currentStep: "Starting...", currentValue: 0, maxValue: 0 },
        queue: { position: ahead + 1, ahead },
        timestamp: "2025-11-25T12:34:56.789Z",
        version: 1,
      },
    ];
    const asked = snapshots({ t2: [queued(8), queued(8), queued(6)] });
    manager = makeManager({ maxStreams: 1, fetch: asked.impl, waitPollMs: 5000 });
    const second = recorder();
    manager.subscribe("t1", {});
    manager.subscribe("t2", second.callbacks);
    await answered();
    timers.advance(5000);
    await answered(); // the same answer again: nothing new to show
    timers.advance(5000);
    await answered();
    assert.deepEqual(second.calls.progress.map((p) => p.queue.ahead), [8, 6]);
    FakeEventSource.latest.emit("complete", COMPLETE, "9");
    assert.deepEqual(openUrls(), ["progress/t2?lastEventId=1"]);
  });

  test("a task that ends while it waits is delivered as ended and never takes a stream", async () => {
    const asked = snapshots({
      t2: [[200, { ...COMPLETE, taskId: "t2", version: 7 }]],
      t3: [[200, { ...ERROR, taskId: "t3", version: 2 }]],
    });
    manager = makeManager({ maxStreams: 1, fetch: asked.impl });
    const second = recorder();
    const third = recorder();
    manager.subscribe("t1", {});
    manager.subscribe("t2", second.callbacks);
    manager.subscribe("t3", third.callbacks);
    await answered();
    assert.deepEqual(second.calls.complete.map((c) => c.result.imageUrl), ["/image/a.png"]);
    assert.deepEqual(third.calls.error.map((e) => e.error.code), ["comfy_error"]);
    assert.equal(manager.isSubscribed("t2"), false);
    assert.equal(manager.isSubscribed("t3"), false);
    FakeEventSource.latest.emit("complete", COMPLETE, "9");
    assert.equal(FakeEventSource.instances.length, 1, "only t1 ever had a stream");
    assert.equal(timers.delays.length, 0, "no poll left behind");
  });

  test("a waiting task the daemon forgot ends as unknown; a daemon away changes nothing", async () => {
    const forgot = snapshots({
      t2: [[404, { error: { code: "unknown_task", details: { taskId: "t2" } } }]],
    });
    manager = makeManager({ maxStreams: 1, fetch: forgot.impl });
    const second = recorder();
    manager.subscribe("t1", {});
    manager.subscribe("t2", second.callbacks);
    await answered();
    assert.deepEqual(second.calls.error.map((e) => e.error.code), [UNKNOWN_TASK]);

    const away = async () => {
      throw new TypeError("Failed to fetch");
    };
    manager = makeManager({ maxStreams: 1, fetch: away });
    const fourth = recorder();
    manager.subscribe("t3", {});
    manager.subscribe("t4", fourth.callbacks);
    await answered();
    assert.deepEqual(fourth.calls, { progress: [], complete: [], error: [] });
    assert.equal(manager.isSubscribed("t4"), true);
    assert.deepEqual(timers.delays, [5000], "asked again later");
  });

  // The browser's 6 connections per site are shared by all its tabs: two tabs
  // following 3 tasks each held them all, and neither could POST or cancel.
  test("slots shared with other tabs: a stream opens once one is free, and gives it back", async () => {
    const locks = new FakeLockManager();
    const otherTab = new SSEManager({
      EventSource: FakeEventSource,
      timers,
      fetch: fakeFetch(200, {}).impl,
      maxStreams: 2,
      slots: lockSlots(locks, 2),
    });
    otherTab.subscribe("a1", {});
    otherTab.subscribe("a2", {});
    await answered();
    assert.equal(locks.held().length, 2);
    const asked = snapshots({ t1: [[200, { ...PROGRESS, version: 3 }]] });
    manager = makeManager({ maxStreams: 2, slots: lockSlots(locks, 2), fetch: asked.impl });
    const mine = recorder();
    manager.subscribe("t1", mine.callbacks);
    await answered();
    assert.deepEqual(openUrls(), ["progress/a1", "progress/a2"], "no slot left for this tab");
    assert.equal(manager.isStreaming("t1"), false);
    assert.equal(mine.calls.progress.length, 1, "it shows its task as a waiting one does");

    FakeEventSource.instances[0].emit("complete", { ...COMPLETE, taskId: "a1" }, "9");
    await answered();
    assert.deepEqual(openUrls(), ["progress/a2", "progress/t1?lastEventId=3"]);
    assert.equal(manager.isStreaming("t1"), true);
    manager.unsubscribe("t1");
    otherTab.unsubscribe("a2");
    await answered();
    assert.deepEqual(locks.held(), [], "every slot given back");
  });

  test("a subscription that ends while it waits for a shared slot takes none", async () => {
    const locks = new FakeLockManager();
    manager = makeManager({ maxStreams: 1, slots: lockSlots(locks, 1) });
    manager.subscribe("t1", {});
    await answered();
    manager.subscribe("t2", {});
    manager.unsubscribe("t1");
    manager.unsubscribe("t2");
    await answered();
    assert.deepEqual(locks.held(), []);
    assert.deepEqual(openUrls(), []);
  });

  test("the default: 4 streams over HTTP/1.x, no limit over HTTP/2 and 3", () => {
    const over = (nextHopProtocol) => ({ getEntriesByType: () => [{ nextHopProtocol }] });
    assert.equal(HTTP1_MAX_STREAMS, 4);
    assert.equal(defaultMaxStreams(over("http/1.1")), 4);
    assert.equal(defaultMaxStreams(over("h2")), Infinity);
    assert.equal(defaultMaxStreams(over("h3")), Infinity);
    assert.equal(defaultMaxStreams(undefined), 4);
    assert.equal(defaultMaxStreams({ getEntriesByType: () => [] }), 4);
  });
});

describe("module", () => {
  test("progressUrl escapes the last id too", () => {
    assert.equal(progressUrl("", "t", "1 2"), "progress/t?lastEventId=1%202");
    assert.equal(progressUrl("", "t", null), "progress/t");
  });

  test("the singleton is an SSEManager that resolves EventSource lazily", () => {
    // Node has no EventSource; constructing the singleton must not need one.
    assert.ok(sseManager instanceof SSEManager);
    assert.equal(sseManager.activeConnections.size, 0);
  });
});
