// The daemon's HTTP API as the page uses it: POST generate, DELETE tasks/<id>.
// Every URL is relative to the page, so the page works behind a reverse proxy
// under a sub-path (https://host/comfy/ -> https://host/comfy/generate).
// `fetch` is injected so the request/response handling is tested in Node.

/** A request the daemon (or something in front of it) refused. */
export class ApiError extends Error {
  constructor(message, { status = 0, details = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.details = details;
  }
}

/**
 * "/image/a.png" -> "image/a.png": the daemon's root-relative URLs made
 * relative to the page. Absolute URLs (another origin, a CDN) are kept.
 */
export function pageRelativeUrl(url) {
  if (typeof url !== "string" || url === "") return url;
  if (/^[a-z][a-z0-9+.-]*:/i.test(url) || url.startsWith("//")) return url;
  return url.replace(/^\/+/, "");
}

/**
 * The JSON body for POST /generate from the form's raw strings: empty fields
 * are left out (the daemon picks a seed and reports it back); a seed that is
 * not a plain number is sent as typed so the daemon's validation message
 * reaches the user.
 */
export function generateBody({ prompt, workflow, seed, name }) {
  const body = { prompt: prompt ?? "" };
  if (workflow) body.workflow = workflow;
  const seedText = (seed ?? "").trim();
  if (name && name.trim()) body.name = name.trim();
  if (seedText === "") return JSON.stringify(body);
  if (!/^\d+$/.test(seedText)) return JSON.stringify({ ...body, seed: seedText });
  // Seeds go up to 2**64-1, past what a JS number holds exactly: splice the
  // digits into the JSON text instead of converting them.
  const json = JSON.stringify(body);
  return `${json.slice(0, -1)},"seed":${seedText.replace(/^0+(?=\d)/, "")}}`;
}

/** The daemon's `{"error": {"message", "details"}}`, or a description of what came back. */
async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (e.g. a proxy's HTML error page): describe the status instead
  }
  const error = body && typeof body === "object" ? body.error : null;
  if (error && typeof error.message === "string") {
    return new ApiError(error.message, { status: response.status, details: error.details ?? null });
  }
  const reason = response.statusText ? ` ${response.statusText}` : "";
  return new ApiError(`The server answered ${response.status}${reason}`, {
    status: response.status,
  });
}

async function send(fetchImpl, url, init) {
  try {
    return await fetchImpl(url, init);
  } catch (cause) {
    throw new ApiError("Could not reach the server", { details: String(cause) });
  }
}

/**
 * Start a generation. Resolves with the daemon's 202 answer
 * ({taskId, status: "queued", progressUrl, statusUrl}) as soon as the task is
 * accepted; progress then comes over SSE. Rejects with an ApiError.
 */
export async function postGenerate(fields, { fetch: fetchImpl = globalThis.fetch } = {}) {
  const response = await send(fetchImpl, "generate", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: generateBody(fields),
  });
  if (!response.ok) throw await errorFrom(response);
  const reply = await response.json();
  if (!reply || typeof reply.taskId !== "string" || reply.taskId === "") {
    throw new ApiError("The server accepted the request but sent no task id", {
      status: response.status,
    });
  }
  return reply;
}

/** Ask the daemon to cancel a task; the progress stream then ends with an error-event. */
export async function cancelTask(taskId, { fetch: fetchImpl = globalThis.fetch } = {}) {
  const response = await send(fetchImpl, `tasks/${encodeURIComponent(taskId)}`, {
    method: "DELETE",
    headers: { Accept: "application/json" },
  });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}
