// How a job's settings read, shared by the result panel and the history.

import { el } from "./dom.js";
import { t } from "./i18n.js";

// Jobs stored before the sampler choice ran the official one; those before LoRA support, none.
export function summaryText(job) {
  const settings = t("summary", { sample_solver: "unipc", ...job.parameters });
  return job.parameters.lora ? `${settings} · ${t("summary_lora", job.parameters)}` : settings;
}

/** One line per field where a server pin replaced the value the request asked for. */
export const overrideItems = (job) =>
  job.overridden.map((item) => el("li", {}, t("override", { ...item, field: t(`field.${item.field}`) })));
