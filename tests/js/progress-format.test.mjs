import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  NODE_STEP_NAMES,
  RateEstimator,
  displayPercentage,
  errorText,
  formatEta,
  queueText,
  statusOf,
  stepCounter,
  stepText,
} from "../../public/js/custom-ui/progress-format.mjs";
import { NODE_STEP_NAMES as FROM_BANNER } from "../../public/js/custom-ui/progress-banner.mjs";

function running(progress, extra = {}) {
  return { taskId: "t", status: "in-progress", phase: "running", progress, queue: null, ...extra };
}
const queued = (queue, currentStep = "Queued") => ({
  taskId: "t",
  status: "in-progress",
  phase: "queued",
  progress: { percentage: 0, currentStep, currentValue: 0, maxValue: 0 },
  queue,
});

describe("step text", () => {
  test("the seed's node types have names, and the banner module exports the same map", () => {
    for (const type of [
      "KSampler",
      "VAEDecode",
      "SaveImage",
      "CLIPTextEncode",
      "CheckpointLoaderSimple",
      "EmptyLatentImage",
      "VAEEncodeForInpaint",
      "LoadImage",
    ]) {
      assert.ok(NODE_STEP_NAMES[type], type);
    }
    assert.equal(FROM_BANNER, NODE_STEP_NAMES);
  });

  test("a known nodeType uses the page's wording, over the server's text", () => {
    const msg = running({ currentStep: "Running KSampler...", nodeType: "KSampler" });
    assert.equal(stepText(msg), "Sampling image...");
  });

  test("an unknown nodeType or none falls back to the server's currentStep", () => {
    assert.equal(
      stepText(running({ currentStep: "Running MyNode...", nodeType: "MyNode" })),
      "Running MyNode...",
    );
    assert.equal(stepText(queued(null, "Waiting for ComfyUI...")), "Waiting for ComfyUI...");
  });

  test("a lifecycle step (cancelling) wins over the node's name", () => {
    const msg = running({ currentStep: "Cancelling...", nodeType: "KSampler" });
    assert.equal(stepText(msg), "Cancelling...");
  });

  test("no text at all still says something", () => {
    assert.equal(stepText({ status: "in-progress" }), "Working...");
  });

  test("the counter shows sampler steps only while running", () => {
    assert.equal(stepCounter(running({ currentValue: 9, maxValue: 20 })), "9/20");
    assert.equal(stepCounter(running({ currentValue: 0, maxValue: 1 })), "");
    assert.equal(stepCounter(queued(null)), "");
  });
});

describe("status and percentage", () => {
  test("statusOf maps the server's status and phase", () => {
    assert.equal(statusOf(queued(null)), "queued");
    assert.equal(statusOf(running({})), "running");
    assert.equal(statusOf({ status: "completed" }), "completed");
    assert.equal(statusOf({ status: "error" }), "error");
    assert.equal(statusOf({ status: "in-progress" }), "queued", "no phase yet: not running");
  });

  test("the overall percentage drives the bar when present", () => {
    const msg = running({ percentage: 10, overall: { percentage: 58.9, nodesDone: 4, nodesTotal: 7 } });
    assert.equal(displayPercentage(msg), 58);
  });

  test("without overall, the seed's per-node percentage is used", () => {
    assert.equal(displayPercentage(running({ percentage: 45 })), 45);
  });

  test("a running task never shows 100, a completed one always does", () => {
    assert.equal(displayPercentage(running({ overall: { percentage: 100 } })), 99);
    assert.equal(displayPercentage({ status: "completed", progress: { percentage: 100 } }), 100);
  });

  test("garbage becomes 0, out-of-range is clamped", () => {
    assert.equal(displayPercentage(running({})), 0);
    assert.equal(displayPercentage(running({ percentage: "x" })), 0);
    assert.equal(displayPercentage(running({ percentage: -5 })), 0);
  });
});

describe("queue", () => {
  test("how many are ahead, or next in line, only while queued", () => {
    assert.equal(queueText(queued({ position: 3, ahead: 2 })), "2 ahead of you in the queue");
    assert.equal(queueText(queued({ position: 1, ahead: 0 })), "Next in the queue");
    assert.equal(queueText(queued(null)), "");
    assert.equal(queueText(running({}, { queue: { position: 0, ahead: 0 } })), "");
  });
});

describe("ETA", () => {
  test("formatting", () => {
    assert.equal(formatEta(null), "");
    assert.equal(formatEta(Number.NaN), "");
    assert.equal(formatEta(0.2), "about 1 s left");
    assert.equal(formatEta(0), "almost done");
    assert.equal(formatEta(42.1), "about 43 s left");
    assert.equal(formatEta(80), "about 1 min 20 s left");
    assert.equal(formatEta(120), "about 2 min left");
  });

  const tick = (value, extra = {}) =>
    running({ node: "3", nodeType: "KSampler", currentValue: value, maxValue: 20, ...extra });

  test("the client estimate comes from the running node's step rate", () => {
    const eta = new RateEstimator();
    assert.equal(eta.update(tick(2), 1000), null);
    // 2 -> 6 steps in 2 s: 2 steps/s; 14 steps left -> 7 s.
    assert.equal(eta.update(tick(6), 3000), 7);
  });

  test("the server's etaSeconds stands in until two ticks give a rate", () => {
    const eta = new RateEstimator();
    assert.equal(eta.update(tick(4, { etaSeconds: 9.5 }), 0), 9.5);
    assert.equal(eta.update(tick(4, { etaSeconds: 9 }), 500), 9, "no step yet: no rate");
    assert.equal(eta.update(tick(8, { etaSeconds: 30 }), 4000), 12, "then ours: 1 step/s, 12 left");
  });

  test("a new node starts a new rate (fast loaders do not skew the sampler's)", () => {
    const eta = new RateEstimator();
    eta.update(running({ node: "4", currentValue: 0, maxValue: 1 }), 0);
    eta.update(running({ node: "4", currentValue: 1, maxValue: 1 }), 10);
    assert.equal(eta.update(tick(1), 1000), null);
    assert.equal(eta.update(tick(3), 2000), 8.5);
  });

  test("steps going back (a restarted node) start a new origin", () => {
    const eta = new RateEstimator();
    eta.update(tick(10), 0);
    assert.equal(eta.update(tick(2), 1000), null);
    assert.equal(eta.update(tick(4), 3000), 16);
  });

  test("a restarted daemon's snapshot of the node at 0/1 is no step back: ComfyUI went on", () => {
    // A page that first saw the node mid-way (opened or reloaded then): its rate
    // starts at step 2. The daemon comes back knowing the node ComfyUI is on, not
    // its count, and says 0/1. Taken for the node starting over, the rate started
    // there, and the steps made while the daemon was away looked done in an
    // instant: "about 2 s left" for 12 steps at 1 step/s, off for the rest of the node.
    const eta = new RateEstimator();
    eta.update(tick(2), 2000);
    assert.equal(eta.update(tick(4), 4000), 16);
    const resumed = running({ node: "3", nodeType: "KSampler", currentValue: 0, maxValue: 1 });
    assert.equal(eta.update(resumed, 7000), null, "no count, and no server rate yet");
    assert.equal(eta.update(tick(8, { etaSeconds: null }), 8000), 12);
    assert.equal(eta.update(tick(9, { etaSeconds: 11 }), 9000), 11);
  });

  test("outside the running phase there is no estimate, and the rate is forgotten", () => {
    const eta = new RateEstimator();
    eta.update(tick(2), 0);
    assert.equal(eta.update(queued(null), 1000), null);
    assert.equal(eta.update(tick(4), 2000), null, "a fresh origin after leaving running");
  });

  test("nodes without steps give no client rate", () => {
    const eta = new RateEstimator();
    assert.equal(eta.update(running({ node: "8", currentValue: 0, maxValue: 0 }), 0), null);
  });
});

test("errorText prefers the server's message", () => {
  assert.equal(errorText({ error: { message: "CUDA out of memory" } }), "CUDA out of memory");
  assert.equal(errorText({}), "Generation failed");
});
