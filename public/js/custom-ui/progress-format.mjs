// What the progress banner shows, computed from the daemon's messages.
// Pure functions (and one small estimator fed with explicit times), so they
// are tested in Node without a DOM; progress-banner.mjs only renders them.

/** ComfyUI class_type -> the page's wording for that step (the seed's map, extended). */
export const NODE_STEP_NAMES = Object.freeze({
  CheckpointLoaderSimple: "Loading model...",
  CheckpointLoader: "Loading model...",
  UNETLoader: "Loading model...",
  CLIPLoader: "Loading text encoder...",
  DualCLIPLoader: "Loading text encoder...",
  VAELoader: "Loading VAE...",
  LoraLoader: "Loading LoRA...",
  ControlNetLoader: "Loading ControlNet...",
  CLIPTextEncode: "Encoding prompt...",
  EmptyLatentImage: "Preparing latent image...",
  LoadImage: "Loading image...",
  LoadImageMask: "Loading mask...",
  VAEEncode: "Encoding image...",
  VAEEncodeForInpaint: "Preparing inpainting...",
  SetLatentNoiseMask: "Preparing inpainting...",
  KSampler: "Sampling image...",
  KSamplerAdvanced: "Sampling image...",
  SamplerCustom: "Sampling image...",
  SamplerCustomAdvanced: "Sampling image...",
  ControlNetApply: "Applying ControlNet...",
  ControlNetApplyAdvanced: "Applying ControlNet...",
  VAEDecode: "Decoding image...",
  VAEDecodeTiled: "Decoding image...",
  ImageScale: "Scaling image...",
  ImageUpscaleWithModel: "Upscaling image...",
  SaveImage: "Saving image...",
  PreviewImage: "Preparing preview...",
});

// Server step texts that describe the task, not the node it is on: they win
// over the node's name (a task being cancelled still names its last node).
const LIFECYCLE_STEPS = new Set(["Cancelling...", "Complete", "Failed"]);

/** The banner's status: queued | running | completed | error. */
export function statusOf(message) {
  if (message.status === "completed") return "completed";
  if (message.status === "error") return "error";
  return message.phase === "running" ? "running" : "queued";
}

/**
 * The step text. A message naming the running node's type uses our wording
 * for that type; otherwise (queued, waiting, node types we do not know) the
 * server's `currentStep` is shown as is.
 */
export function stepText(message) {
  const progress = message.progress ?? {};
  const serverStep = progress.currentStep ?? "";
  const named = progress.nodeType ? NODE_STEP_NAMES[progress.nodeType] : undefined;
  if (named && !LIFECYCLE_STEPS.has(serverStep)) return named;
  return serverStep || "Working...";
}

/** "9/20" for nodes that count steps (samplers), "" otherwise. */
export function stepCounter(message) {
  const { currentValue, maxValue } = message.progress ?? {};
  if (statusOf(message) !== "running" || !(maxValue > 1)) return "";
  return `${currentValue}/${maxValue}`;
}

/**
 * The bar's percentage, 0..100, whole numbers. The whole graph's progress
 * (`progress.overall.percentage`) when the daemon sends it, because the
 * per-node percentage starts over at every node and a bar that jumps back
 * reads as a bug; the seed's per-node `percentage` otherwise. 100 is kept for
 * "completed": a running task shows at most 99.
 */
export function displayPercentage(message) {
  const status = statusOf(message);
  if (status === "completed") return 100;
  const progress = message.progress ?? {};
  const overall = progress.overall?.percentage;
  const raw = typeof overall === "number" ? overall : progress.percentage;
  if (typeof raw !== "number" || !Number.isFinite(raw)) return 0;
  return Math.min(99, Math.max(0, Math.floor(raw)));
}

/** "2 ahead of you in the queue" / "Next in the queue" / "" when not queued. */
export function queueText(message) {
  const queue = message.queue;
  if (!queue || statusOf(message) !== "queued") return "";
  if (queue.ahead > 0) return `${queue.ahead} ahead of you in the queue`;
  return "Next in the queue";
}

/** "about 5 s left", "about 1 min 20 s left"; "" when unknown. */
export function formatEta(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return "";
  const whole = Math.ceil(seconds);
  if (whole < 1) return "almost done";
  if (whole < 60) return `about ${whole} s left`;
  const minutes = Math.floor(whole / 60);
  const rest = whole % 60;
  return rest ? `about ${minutes} min ${rest} s left` : `about ${minutes} min left`;
}

/**
 * Time left, from the rate of the running node's steps (the seed's "estimated
 * time remaining based on progress rate"). Only nodes that count steps
 * (samplers) give a rate, and they take nearly all of a generation's time, so
 * this stands for the task; the loaders before them finish in a blink and
 * would make a whole-graph rate wildly optimistic. Until two ticks of one node
 * give a rate (first tick, a page reloaded mid-way) the daemon's `etaSeconds`,
 * computed the same way from ComfyUI's own tick times, stands in. A daemon
 * restart keeps the rate: ComfyUI's steps went on, and the origin still holds.
 */
export class RateEstimator {
  constructor() {
    this._origin = null; // {node, value, atMs}: the first tick seen of the running node
  }

  /** Feed one message received at `nowMs`; returns seconds left, or null when unknown. */
  update(message, nowMs) {
    if (statusOf(message) !== "running") {
      this._origin = null;
      return null;
    }
    const progress = message.progress ?? {};
    const node = progress.node ?? null;
    const value = Number(progress.currentValue);
    const max = Number(progress.maxValue);
    const serverEta = typeof progress.etaSeconds === "number" ? progress.etaSeconds : null;
    if (!(max > 0) || !Number.isFinite(value)) return serverEta;
    const origin = this._origin;
    // 0 of at most 1 for the node already followed counts no step: a restarted
    // daemon says so of the node ComfyUI is on (it lost the count, ComfyUI went
    // on). As a step back it would restart the rate there, and the steps made
    // meanwhile would look done in an instant for the rest of the node.
    if (origin !== null && origin.node === node && value === 0 && max <= 1) return serverEta;
    if (origin === null || origin.node !== node || value < origin.value) {
      this._origin = { node, value, atMs: nowMs };
      return serverEta;
    }
    const steps = value - origin.value;
    const elapsedMs = nowMs - origin.atMs;
    if (steps <= 0 || elapsedMs <= 0) return serverEta;
    return (Math.max(0, max - value) * elapsedMs) / steps / 1000;
  }
}

/** The error text for an error-event (or the client's own give-up message). */
export function errorText(message) {
  const error = message.error ?? {};
  return error.message || "Generation failed";
}
