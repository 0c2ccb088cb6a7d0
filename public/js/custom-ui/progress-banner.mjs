// ProgressBanner: one task's live progress, fixed at the top of the page.
//
// It subscribes to the task's SSE stream on mount and unsubscribes on unmount.
// Several banners stack inside a BannerStack. What to show is computed in
// progress-format.mjs; this file only holds state and renders it.
//
// Props:
//   taskId      the task to follow
//   sseManager  an SSEManager (the page passes the singleton)
//   label       optional title (e.g. the image's name or prompt)
//   onComplete(result, message)  the task finished: `result` is the daemon's result object
//   onError(message)             the task failed (the daemon's error-event, or losing the stream)
//   onCancel(taskId)             the user pressed Cancel (the parent asks the daemon)
//   onDismiss(taskId)            the banner is done and hidden: the parent may unmount it
//   hideDelayMs  how long a completed banner shows its full bar before hiding (default 800)
//   now          clock for the ETA (default Date.now), injectable for tests
//
// Dismissing a running task only hides the banner: it stays subscribed so the
// image still reaches the carousel, and an error brings the banner back.

import { Component } from "preact";
import { html } from "htm/preact";

import { pageRelativeUrl } from "../api.mjs";
import { PreviewThumbnail } from "./preview-thumbnail.mjs";

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
} from "./progress-format.mjs";

export { NODE_STEP_NAMES };

const DEFAULT_HIDE_DELAY_MS = 800;

export class ProgressBanner extends Component {
  constructor(props) {
    super(props);
    this.state = {
      isVisible: true,
      progress: null, // the last message's `progress` object, as sent
      message: "Starting...", // the step text
      status: "queued", // queued | running | completed | error
      percentage: 0,
      counter: "",
      eta: "",
      queue: "",
      errorMessage: "",
    };
    this._estimator = new RateEstimator();
    this._hideTimer = null;
    this.handleDismiss = this.handleDismiss.bind(this);
    this.handleCancel = this.handleCancel.bind(this);
    this.handleProgressUpdate = this.handleProgressUpdate.bind(this);
    this.handleComplete = this.handleComplete.bind(this);
    this.handleError = this.handleError.bind(this);
  }

  componentDidMount() {
    this.props.sseManager.subscribe(this.props.taskId, {
      onProgress: this.handleProgressUpdate,
      onComplete: this.handleComplete,
      onError: this.handleError,
    });
  }

  componentWillUnmount() {
    this.props.sseManager.unsubscribe(this.props.taskId);
    clearTimeout(this._hideTimer);
  }

  _now() {
    return (this.props.now ?? Date.now)();
  }

  handleProgressUpdate(data) {
    this.setState({
      progress: data.progress ?? null,
      message: stepText(data),
      status: statusOf(data),
      percentage: displayPercentage(data),
      counter: stepCounter(data),
      eta: formatEta(this._estimator.update(data, this._now())),
      queue: queueText(data),
    });
  }

  handleComplete(data) {
    this.setState({
      progress: data.progress ?? null,
      message: stepText(data),
      status: "completed",
      percentage: 100,
      counter: "",
      eta: "",
      queue: "",
    });
    this.props.onComplete?.(data.result ?? {}, data);
    // Let the full bar be seen, then get out of the way.
    const delay = this.state.isVisible ? (this.props.hideDelayMs ?? DEFAULT_HIDE_DELAY_MS) : 0;
    this._hideTimer = setTimeout(() => this._close(), delay);
  }

  handleError(data) {
    this.setState({
      isVisible: true, // a failure is worth showing even if the banner was dismissed
      progress: data.progress ?? null,
      message: "Failed",
      status: "error",
      counter: "",
      eta: "",
      queue: "",
      errorMessage: errorText(data),
    });
    this.props.onError?.(data);
  }

  handleCancel() {
    this.props.onCancel?.(this.props.taskId);
  }

  handleDismiss() {
    const { status } = this.state;
    if (status === "completed" || status === "error") {
      this._close();
    } else {
      this.setState({ isVisible: false }); // still following: the result is still wanted
    }
  }

  _close() {
    clearTimeout(this._hideTimer);
    this.setState({ isVisible: false });
    this.props.onDismiss?.(this.props.taskId);
  }

  render({ taskId, label }, state) {
    if (!state.isVisible) return null;
    const { status, percentage } = state;
    const active = status === "queued" || status === "running";
    const details = [state.queue, state.eta].filter(Boolean).join(" · ");
    const previewUrl = active ? state.progress?.preview?.url : null;
    return html`
      <section
        class=${`progress-banner progress-banner--${status}`}
        data-task-id=${taskId}
        data-status=${status}
        aria-label=${label ? `Progress of ${label}` : "Generation progress"}
      >
        <div class="progress-banner__row">
          <${PreviewThumbnail}
            url=${previewUrl ? pageRelativeUrl(previewUrl) : null}
            alt=${label ? `Live preview of ${label}` : "Live preview"}
          />
          ${label ? html`<span class="progress-banner__label">${label}</span>` : null}
          <span class="progress-banner__step" aria-live="polite">${state.message}</span>
          ${state.counter
            ? html`<span class="progress-banner__counter">${state.counter}</span>`
            : null}
          <span class="progress-banner__percent">${percentage}%</span>
          ${active
            ? html`<button type="button" class="progress-banner__cancel" onClick=${this.handleCancel}>
                Cancel
              </button>`
            : null}
          <button
            type="button"
            class="progress-banner__dismiss"
            aria-label="Dismiss"
            title="Dismiss"
            onClick=${this.handleDismiss}
          >
            ×
          </button>
        </div>
        <div
          class="progress-banner__track"
          role="progressbar"
          aria-valuemin="0"
          aria-valuemax="100"
          aria-valuenow=${percentage}
        >
          <div class="progress-banner__fill" style=${{ width: `${percentage}%` }}></div>
        </div>
        ${details ? html`<div class="progress-banner__details">${details}</div>` : null}
        ${status === "error"
          ? html`<div class="progress-banner__error" role="alert">${state.errorMessage}</div>`
          : null}
      </section>
    `;
  }
}

/** The fixed container at the top of the page; banners stack inside it, newest last. */
export function BannerStack({ children }) {
  return html`<div class="banner-stack" aria-label="Running generations">${children}</div>`;
}
