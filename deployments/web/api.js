// The gateway's HTTP API. Every URL is relative: the page may live under a route prefix.

const KEY_STORAGE = "wan-t2v.api_key";

/** An HTTP error with the API's body: {error: {code, message, fields: [{field, value, message}]}}. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.fields = error.fields ?? [];
  }
}

/** The API key typed into the page, kept in this browser only; sent as a Bearer token on every call. */
export const apiKey = () => localStorage.getItem(KEY_STORAGE) ?? "";

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function withKey(headers = {}) {
  const key = apiKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
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
  const init = { method, headers: withKey({ Accept: "application/json" }) };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await checked(await fetch(path, init));
  return parseJson(await response.text());
}

async function checked(response) {
  if (response.ok) return response;
  const text = await response.text();
  let error;
  try {
    error = parseJson(text).error;
  } catch {
    // not the API's JSON (a proxy's error page, say): the status line says it
  }
  throw new ApiError(response.status, error ?? { message: `HTTP ${response.status} ${response.statusText}` });
}

/**
 * The job's Server-Sent Events, read with fetch because EventSource cannot send the key:
 * calls onEvent(type, job) for each event until the server ends the stream.
 */
export async function readEvents(id, onEvent, signal) {
  const response = await checked(await fetch(eventsUrl(id), { headers: withKey({ Accept: "text/event-stream" }), signal }));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const type = lines.find((line) => line.startsWith("event: "))?.slice(7) ?? "message";
      const data = lines.filter((line) => line.startsWith("data: ")).map((line) => line.slice(6));
      if (data.length) onEvent(type, parseJson(data.join("\n"))); // keepalive comments carry no data
    }
  }
}

const blobs = new Map(); // path -> Promise of a blob: URL; a finished job's files never change

/**
 * Points `node[property]` (a <video> src, an <img> src, a link's href) at `path`. Media elements
 * send no headers, so with a key the file is fetched with it and shown from a blob: URL.
 */
export function showMedia(node, property, path) {
  if (!apiKey()) {
    node[property] = path;
    return;
  }
  if (!blobs.has(path)) {
    blobs.set(path, fetch(path, { headers: withKey() }).then(checked).then((response) => response.blob()).then(URL.createObjectURL));
  }
  blobs.get(path).then((url) => { node[property] = url; }, () => blobs.delete(path)); // a failed fetch is retried next time
}

const videoPath = (id) => `v1/videos/${encodeURIComponent(id)}`;
export const videoUrl = (id) => `${videoPath(id)}/content`;
export const thumbnailUrl = (id) => `${videoUrl(id)}?variant=thumbnail`;
const eventsUrl = (id) => `${videoPath(id)}/events`;
// Not DELETE: a job that finished meanwhile would lose its video; cancel leaves it as it is (a 409).
export const cancelJob = (id) => api(`${videoPath(id)}/cancel`, { method: "POST" });
