// Toasts: short notices in a corner. The page owns the list and the timers;
// this only renders it.

import { html } from "htm/preact";

/**
 * @param {{toasts: {id: number, kind: "success"|"error", text: string}[], onClose: (id: number) => void}} props
 */
export function ToastStack({ toasts, onClose }) {
  return html`<div class="toast-stack">
    ${toasts.map(
      (t) => html`<div
        key=${t.id}
        class=${`toast toast--${t.kind}`}
        role=${t.kind === "error" ? "alert" : "status"}
      >
        <span class="toast__text">${t.text}</span>
        <button type="button" class="toast__close" aria-label="Close" onClick=${() => onClose(t.id)}>
          ×
        </button>
      </div>`,
    )}
  </div>`;
}
