// The result panel: follows one job over its event stream (progress bar, phase, step n/N, time left
// from the step timing), then plays the finished video and offers it for download.

import { ApiError, cancelJob, readEvents, showMedia, thumbnailUrl, videoUrl } from "./api.js";
import { overrideItems, summaryText } from "./describe.js";
import { $ } from "./dom.js";
import { t } from "./i18n.js";

const TERMINAL = ["completed", "failed", "cancelled"];
const RECONNECT_MS = 2000;

let job = null;
let following = null; // aborts the stream of the job shown before
let clock = {}; // the first and the latest denoising step seen, with when they were seen
let lost = false;

/** Shows `next` and follows it until it ends; `onFinished(job)` runs once it has. */
export function followJob(next, onFinished) {
  following?.abort();
  following = new AbortController();
  job = next;
  clock = {};
  lost = false;
  $("#result").hidden = true;
  $("#video").removeAttribute("src");
  renderJob();
  follow(following.signal, onFinished);
}

/** Reads the job's events until `done`; a dropped stream is reopened, as EventSource would (it starts with the current state). */
async function follow(signal, onFinished) {
  let finished = false;
  while (!finished && !signal.aborted) {
    try {
      await readEvents(job.id, (type, next) => {
        update(next);
        finished ||= type === "done";
      }, signal);
    } catch (error) {
      if (error instanceof ApiError) { // refused (no key, job gone): asking again will not help
        lost = true;
        renderJob();
        return;
      }
    }
    if (!finished && !signal.aborted) await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
  }
  if (!finished) return;
  if (job.status === "completed") showVideo();
  onFinished(job);
}

export function cancelCurrent() {
  return cancelJob(job.id);
}

export function renderJob() {
  if (!job) return;
  $("#output-idle").hidden = true;
  $("#job").hidden = false;
  $("#job-prompt").textContent = job.prompt;
  $("#job-summary").textContent = summaryText(job);
  $("#job-overrides").replaceChildren(...overrideItems(job));
  $("#progress").value = job.progress;
  $("#progress-text").textContent = lost ? t("progress.lost") : progressText();
  $("#cancel").hidden = TERMINAL.includes(job.status);
}

function update(next) {
  job = next;
  if (job.phase === "denoise") tick(job.step);
  renderJob();
}

function progressText() {
  switch (job.status) {
    case "queued":
      return joined(t("status.queued"), job.queue_position && t("progress.queue", { position: job.queue_position }));
    case "failed":
      return t("progress.failed", { message: job.error?.message });
    case "in_progress": {
      const seconds = secondsLeft();
      return joined(
        t(`phase.${job.phase}`),
        t("progress.step", { step: job.step, total: job.total_steps }),
        seconds !== null && t("progress.eta", { seconds }),
      );
    }
    default:
      return t(`status.${job.status}`);
  }
}

const joined = (...parts) => parts.filter(Boolean).join(" · ");

function tick(step) {
  if (clock.last && step <= clock.last.step) return;
  clock.last = { step, at: performance.now() };
  clock.first ??= clock.last;
}

/** Denoising steps left times the mean step time seen so far; null until two steps were seen. */
function secondsLeft() {
  const { first, last } = clock;
  if (job.phase !== "denoise" || !first || last.step === first.step) return null;
  const msPerStep = (last.at - first.at) / (last.step - first.step);
  return Math.round((msPerStep * (job.total_steps - last.step)) / 1000);
}

function showVideo() {
  showMedia($("#video"), "src", videoUrl(job.id));
  showMedia($("#video"), "poster", thumbnailUrl(job.id));
  showMedia($("#download"), "href", videoUrl(job.id));
  $("#download").download = `${job.id}.mp4`;
  $("#result").hidden = false;
}
