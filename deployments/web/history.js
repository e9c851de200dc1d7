// The recent jobs: thumbnail, status, prompt (as text), parameters, and "generate again".

import { showMedia, thumbnailUrl } from "./api.js";
import { overrideItems, summaryText } from "./describe.js";
import { $, el } from "./dom.js";
import { language, t } from "./i18n.js";

/** `actions.onAgain(job)` refills the form; `actions.onShow(job)` opens the job in the result panel. */
export function renderHistory(jobs, actions) {
  $("#history").replaceChildren(...jobs.map((job) => historyItem(job, actions)));
  $("#history-empty").hidden = jobs.length > 0;
}

function historyItem(job, { onAgain, onShow }) {
  const preview = el("button", { type: "button", className: "thumb", title: t("history.show") }, thumbnail(job));
  preview.addEventListener("click", () => onShow(job));
  const again = el("button", { type: "button", className: "secondary" }, t("history.again"));
  again.addEventListener("click", () => onAgain(job));
  const error = job.error ? [el("p", { className: "job-error" }, job.error.message)] : [];
  return el("li", { className: "history-item", dataset: { jobId: job.id } },
    preview,
    el("div", { className: "history-body" },
      el("div", { className: "history-head" },
        el("span", { className: `badge status-${job.status}` }, t(`status.${job.status}`)),
        el("time", { dateTime: new Date(job.created_at * 1000).toISOString() }, createdAt(job))),
      el("p", { className: "prompt-text" }, job.prompt),
      el("p", { className: "summary" }, summaryText(job)),
      el("ul", { className: "overrides" }, ...overrideItems(job)),
      ...error,
      again,
    ),
  );
}

function thumbnail(job) {
  if (job.status !== "completed") return el("span", { className: "thumb-empty" });
  const image = el("img", { alt: "", loading: "lazy" });
  showMedia(image, "src", thumbnailUrl(job.id));
  return image;
}

function createdAt(job) {
  const locale = language() === "zh" ? "zh-CN" : "en-GB";
  return new Date(job.created_at * 1000).toLocaleString(locale, { dateStyle: "short", timeStyle: "short" });
}
