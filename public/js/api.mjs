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

const TOKEN_KEY = "comfy-progress.apiToken";
const MAX_TOKEN_PROMPTS = 3;

/**
 * Where the page keeps the API token: this browser's localStorage. The daemon
 * never puts a token into the page it serves (every visitor would get it);
 * the user types it in once, when the daemon first answers 401.
 */
export const browserTokenStore = {
  get() {
    try {
      return globalThis.localStorage?.getItem(TOKEN_KEY) || null;
    } catch {
      return null; // storage disabled (privacy settings): ask each time
    }
  },
  set(token) {
    try {
      if (token) globalThis.localStorage?.setItem(TOKEN_KEY, token);
      else globalThis.localStorage?.removeItem(TOKEN_KEY);
    } catch {
      // storage disabled: the token lives only as long as this request
    }
  },
};

/** Ask the user for a token (null: they cancelled). */
export function promptForToken(rejected) {
  const message = rejected
    ? "The server did not accept that API token. Enter a valid one:"
    : "This server needs an API token. Enter it (this browser keeps it):";
  return globalThis.prompt?.(message) ?? null;
}

/**
 * `fetch` with the stored token as `Authorization: Bearer`. On a 401 the user
 * is asked for a token and the request is sent again; a token is stored once
 * the daemon accepted it. When the user cancels, the 401 is the answer.
 */
async function sendAuthorized(
  fetchImpl,
  url,
  init,
  { tokens = browserTokenStore, askToken = promptForToken } = {},
) {
  let token = tokens.get();
  let entered = false;
  for (let asked = 0; ; asked++) {
    const headers = { ...init.headers };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await send(fetchImpl, url, { ...init, headers });
    if (response.status !== 401) {
      if (entered) tokens.set(token);
      return response;
    }
    if (token && !entered) tokens.set(null); // the stored one is no longer valid
    if (asked >= MAX_TOKEN_PROMPTS) return response;
    const answer = (askToken(Boolean(token)) ?? "").trim();
    if (!answer) return response;
    token = answer;
    entered = true;
  }
}

/**
 * Start a generation. Resolves with the daemon's 202 answer
 * ({taskId, status: "queued", progressUrl, statusUrl}) as soon as the task is
 * accepted; progress then comes over SSE. Rejects with an ApiError.
 */
export async function postGenerate(fields, { fetch: fetchImpl = globalThis.fetch, ...auth } = {}) {
  const init = {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: generateBody(fields),
  };
  const response = await sendAuthorized(fetchImpl, "generate", init, auth);
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
export async function cancelTask(taskId, { fetch: fetchImpl = globalThis.fetch, ...auth } = {}) {
  const init = { method: "DELETE", headers: { Accept: "application/json" } };
  const response = await sendAuthorized(fetchImpl, `tasks/${encodeURIComponent(taskId)}`, init, auth);
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}
