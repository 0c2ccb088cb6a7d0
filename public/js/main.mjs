// The page: a generate form, a stack of progress banners, the image carousel
// and toasts. Nothing here waits for a generation: handleGenerate returns as
// soon as the daemon answers 202 with a taskId, and the banner follows the
// task over SSE from then on.

import { Component, createRef, render } from "preact";
import { html } from "htm/preact";

import { cancelTask, pageRelativeUrl, postGenerate } from "./api.mjs";
import { CarouselDisplay } from "./custom-ui/carousel-display.mjs";
import { BannerStack, ProgressBanner } from "./custom-ui/progress-banner.mjs";
import { ToastStack } from "./custom-ui/toast.mjs";
import { sseManager } from "./sse-manager.mjs";

const TOAST_MS = 6000;

// The daemon's workflow templates (protocol/workflow.py KNOWN_WORKFLOWS).
const WORKFLOWS = ["txt2img"];

/** Carousel items for a completed task: one per image, URLs relative to the page. */
export function carouselItems(result, taskId) {
  const urls = result.imageUrls?.length ? result.imageUrls : [result.imageUrl].filter(Boolean);
  return urls.map((url) => ({
    image: pageRelativeUrl(url),
    prompt: result.prompt,
    seed: result.seed,
    name: result.name,
    workflow: result.workflow,
    description: result.description,
    uid: result.uid,
    taskId,
  }));
}

export class App extends Component {
  constructor(props) {
    super(props);
    this.state = { tasks: [], toasts: [], submitting: false };
    this.carousel = createRef();
    this._nextToastId = 1;
    this.handleGenerate = this.handleGenerate.bind(this);
    this.handleComplete = this.handleComplete.bind(this);
    this.handleCancel = this.handleCancel.bind(this);
    this.handleDismiss = this.handleDismiss.bind(this);
    this.closeToast = this.closeToast.bind(this);
  }

  toast(kind, text) {
    const id = this._nextToastId++;
    this.setState(({ toasts }) => ({ toasts: [...toasts, { id, kind, text }] }));
    setTimeout(() => this.closeToast(id), TOAST_MS);
  }

  closeToast(id) {
    this.setState(({ toasts }) => ({ toasts: toasts.filter((t) => t.id !== id) }));
  }

  /** POST the form, mount a banner for the new task; a refusal becomes a toast. */
  async handleGenerate(event) {
    event.preventDefault();
    const fields = Object.fromEntries(new FormData(event.currentTarget));
    this.setState({ submitting: true });
    try {
      const { taskId } = await postGenerate(fields);
      const label = fields.name?.trim() || fields.prompt.trim();
      this.setState(({ tasks }) => ({ tasks: [...tasks, { taskId, label }] }));
    } catch (err) {
      this.toast("error", err.message);
    } finally {
      this.setState({ submitting: false });
    }
  }

  handleComplete(taskId, result) {
    for (const item of carouselItems(result, taskId)) this.carousel.current?.addData(item);
    const what = result.name || result.prompt || "your image";
    this.toast("success", `Image ready: ${what}`);
  }

  async handleCancel(taskId) {
    try {
      await cancelTask(taskId);
    } catch (err) {
      this.toast("error", `Could not cancel: ${err.message}`);
    }
  }

  handleDismiss(taskId) {
    this.setState(({ tasks }) => ({ tasks: tasks.filter((t) => t.taskId !== taskId) }));
  }

  render(_props, { tasks, toasts, submitting }) {
    return html`
      <${BannerStack}>
        ${tasks.map(
          ({ taskId, label }) => html`<${ProgressBanner}
            key=${taskId}
            taskId=${taskId}
            label=${label}
            sseManager=${sseManager}
            onComplete=${(result) => this.handleComplete(taskId, result)}
            onCancel=${this.handleCancel}
            onDismiss=${this.handleDismiss}
          />`,
        )}
      <//>
      <main class="page">
        <h1>ComfyUI generator</h1>
        <form class="generate-form" onSubmit=${this.handleGenerate}>
          <label class="generate-form__prompt">
            Prompt
            <textarea name="prompt" rows="3" required placeholder="a lighthouse at dusk, oil painting"></textarea>
          </label>
          <label>
            Workflow
            <select name="workflow">
              ${WORKFLOWS.map((w) => html`<option value=${w}>${w}</option>`)}
            </select>
          </label>
          <label>
            Seed
            <input name="seed" inputmode="numeric" placeholder="random" autocomplete="off" />
          </label>
          <label>
            Name
            <input name="name" placeholder="optional" autocomplete="off" />
          </label>
          <button type="submit" disabled=${submitting}>Generate</button>
        </form>
        <${CarouselDisplay} ref=${this.carousel} />
      </main>
      <${ToastStack} toasts=${toasts} onClose=${this.closeToast} />
    `;
  }
}

const root = globalThis.document?.getElementById("app");
if (root) render(html`<${App} />`, root);
