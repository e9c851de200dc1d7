// Wires the page: reads the server's config, builds the form, submits jobs, keeps the history fresh.

import { ApiError, api, apiKey, setApiKey } from "./api.js";
import { $ } from "./dom.js";
import { buildForm, clearFieldErrors, fillForm, formRequest, showFieldErrors } from "./form.js";
import { renderHistory } from "./history.js";
import { t, toggleLanguage, translate } from "./i18n.js";
import { cancelCurrent, followJob, renderJob } from "./job.js";

const HISTORY_SIZE = 20;

let config = null;
let jobs = [];

const historyActions = {
  onAgain(job) {
    fillForm(job.parameters);
    $("#prompt").focus();
  },
  onShow(job) {
    followJob(job, refreshHistory);
  },
};

async function start() {
  translate();
  $("#lang-toggle").addEventListener("click", () => {
    toggleLanguage();
    render();
  });
  const key = $("#api-key");
  key.value = apiKey();
  key.addEventListener("change", () => {
    setApiKey(key.value.trim());
    location.reload(); // start over with the key: config, history, streams
  });
  try {
    config = await api("v1/config");
  } catch (error) {
    $("#generate").disabled = true;
    showBanner(error.status === 401 ? t("error.key") : t("error.config", { message: error.message }));
    return;
  }
  buildForm(config);
  $("#demo-banner").hidden = !config.model.demo_model;
  $("#generate-form").addEventListener("submit", generate);
  $("#cancel").addEventListener("click", () => cancelCurrent().catch(showError));
  render();
  await refreshHistory();
}

function render() {
  translate();
  if (config) {
    const info = { model: config.model.id, policy: config.memory_policy, encoders: config.text_encoders.join(" + ") };
    $("#server-info").textContent = t("server_info", info);
  }
  renderHistory(jobs, historyActions);
  renderJob();
}

async function generate(event) {
  event.preventDefault();
  clearFieldErrors();
  showBanner("");
  $("#generate").disabled = true;
  try {
    followJob(await api("v1/videos", { method: "POST", json: formRequest() }), refreshHistory);
    await refreshHistory();
  } catch (error) {
    showError(error);
  } finally {
    $("#generate").disabled = false;
  }
}

async function refreshHistory() {
  try {
    jobs = (await api(`v1/videos?limit=${HISTORY_SIZE}`)).data;
    renderHistory(jobs, historyActions);
  } catch (error) {
    showError(error);
  }
}

/** Field errors go next to their fields; anything else goes in the banner under the form. */
function showError(error) {
  if (!(error instanceof ApiError)) {
    showBanner(t("error.network", { message: error.message }));
    return;
  }
  if (error.status === 401) {
    showBanner(t("error.key"));
    return;
  }
  const unplaced = showFieldErrors(error.fields);
  if (error.fields.length === 0 || unplaced.length > 0) showBanner(error.message);
}

function showBanner(message) {
  Object.assign($("#form-error"), { textContent: message, hidden: !message });
}

start();
