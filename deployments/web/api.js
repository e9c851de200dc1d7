// The gateway's HTTP API. Every URL is relative: the page may live under a route prefix.

/** An HTTP error with the API's body: {error: {code, message, fields: [{field, value, message}]}}. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.fields = error.fields ?? [];
  }
}

/** Seeds go up to 2^63-1, past JavaScript's exact integers, so their JSON digits are kept as text. */
export function parseJson(text) {
  return JSON.parse(text, (key, value, context) => (key === "seed" && context ? context.source : value));
}

/** The reverse: integer digits sent as a JSON number, digit for digit. */
export function exactInteger(digits) {
  return JSON.rawJSON ? JSON.rawJSON(digits) : Number(digits);
}

export async function api(path, { method = "GET", json } = {}) {
  const init = { method, headers: { Accept: "application/json" } };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  if (response.ok) return parseJson(text);
  throw new ApiError(response.status, errorOf(response, text));
}

function errorOf(response, text) {
  try {
    return parseJson(text).error;
  } catch {
    return { message: `HTTP ${response.status} ${response.statusText}` };
  }
}

const videoPath = (id) => `v1/videos/${encodeURIComponent(id)}`;
export const videoUrl = (id) => `${videoPath(id)}/content`;
export const thumbnailUrl = (id) => `${videoUrl(id)}?variant=thumbnail`;
export const eventsUrl = (id) => `${videoPath(id)}/events`;
export const cancelJob = (id) => api(videoPath(id), { method: "DELETE" });
