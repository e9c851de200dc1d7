// How a job's settings read, shared by the result panel and the history.

import { el } from "./dom.js";
import { t } from "./i18n.js";

export const summaryText = (job) => t("summary", job.parameters);

/** One line per field where a server pin replaced the value the request asked for. */
export const overrideItems = (job) =>
  job.overridden.map((item) => el("li", {}, t("override", { ...item, field: t(`field.${item.field}`) })));
