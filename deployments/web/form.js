// The parameter controls: built from the server's parameter table, prefilled with what the server would use, locked
// where the server decides, read into a request, and filled back from a job's parameters.

import { exactInteger } from "./api.js";
import { $, el } from "./dom.js";
import { addTexts } from "./i18n.js";

// How each parameter is shown. Its default, range, help and choices come from the server's parameter
// table (GET /v1/config `parameters`, read off pipeline/params.py), so the page offers what the server accepts.
const FIELDS = [
  { name: "size", group: "basic", kind: "select" },
  { name: "frame_num", group: "basic", kind: "number", step: 4 },
  { name: "sample_solver", group: "basic", kind: "select" },
  { name: "sample_steps", group: "basic", kind: "number", step: 1, slider: true },
  { name: "sample_guide_scale", group: "basic", kind: "number", step: 0.5, slider: true },
  { name: "sample_shift", group: "basic", kind: "number", step: 0.5, slider: true },
  { name: "seed", group: "basic", kind: "integer" },
  { name: "negative_prompt", group: "basic", kind: "textarea" },
  { name: "lora", group: "lora", kind: "select" },
  { name: "lora_scale", group: "lora", kind: "number", step: 0.1, slider: true },
  { name: "offload_model", group: "advanced", kind: "checkbox" },
  { name: "t5_cpu", group: "advanced", kind: "checkbox" },
];
const PROMPT = { name: "prompt", kind: "textarea" }; // its box is in index.html

const LIMITS = { frame_num: "max_frame_num", sample_steps: "max_sample_steps" };
const INTEGER = /^-?\d+$/;

let controls = []; // the prompt and every field this server offers: buildForm sets them

const control = (name) => $(`#${name}`);

export function buildForm(config) {
  for (const { name, help } of config.parameters) {
    for (const [lang, text] of Object.entries(help)) addTexts(lang, { [`help.${name}`]: text });
  }
  // Without served adapters the LoRA group stays hidden and its fields are never built, nor sent.
  const servesAdapters = Boolean(config.loras?.length); // an older server sends no `loras`
  $("#lora-fields").hidden = !servesAdapters;
  const fields = FIELDS.filter((field) => field.group !== "lora" || servesAdapters);
  for (const field of fields) $(`#${field.group}-fields`).append(fieldBlock(field, config));
  controls = [PROMPT, ...fields];
  for (const field of controls) control(field.name).addEventListener("input", () => hideError(field.name));
  fillForm({ ...serverDefaults(config), ...config.pins });
  for (const [name, note] of Object.entries(lockedFields(config))) {
    if (control(name)) lock(name, note); // a pinned lora_scale without adapters has no control to lock
  }
}

/** The request body: every enabled control's value (a blank number box is left to the server). */
export function formRequest() {
  const request = {};
  for (const field of controls) {
    const value = read(field);
    if (value !== undefined && !control(field.name).disabled) request[field.name] = value;
  }
  return request;
}

/** Puts a job's parameters back into the form; locked controls keep the server's value. */
export function fillForm(parameters) {
  for (const field of controls) {
    if (field.name in parameters && !control(field.name).disabled) write(field, parameters[field.name]);
  }
}

/** Shows each {field, message} next to its control; returns the messages that have no control. */
export function showFieldErrors(errors) {
  const unplaced = [];
  for (const { field, message } of errors) {
    const slot = document.querySelector(`[data-field-error="${CSS.escape(field)}"]`);
    if (slot) Object.assign(slot, { textContent: message, hidden: false });
    else unplaced.push(message);
  }
  return unplaced;
}

export function clearFieldErrors() {
  for (const slot of document.querySelectorAll("[data-field-error]")) slot.hidden = true;
}

function hideError(name) {
  $(`[data-field-error="${name}"]`).hidden = true;
}

/** What the server uses for a field the request leaves out: built-in, then the operator's defaults. */
function serverDefaults(config) {
  const builtIn = Object.fromEntries(
    config.parameters.filter((parameter) => parameter.default !== null).map(({ name, default: value }) => [name, value]),
  );
  return {
    ...builtIn,
    offload_model: config.memory_policy !== "resident",
    t5_cpu: config.text_encoders.includes("cpu"),
    ...config.defaults,
  };
}

/** Fields a request cannot change on this server, each with the note that says why. */
function lockedFields(config) {
  const locked = Object.fromEntries(Object.keys(config.pins).map((name) => [name, "note.pinned"]));
  if (!config.honor_request_offload) locked.offload_model ??= "note.policy";
  if (config.text_encoders.length === 1) locked.t5_cpu ??= `note.${config.text_encoders[0]}_only`;
  return locked;
}

function lock(name, note) {
  const block = $(`[data-field="${name}"]`);
  for (const input of block.querySelectorAll("input, select, textarea")) input.disabled = true;
  const slot = block.querySelector("[data-note]");
  slot.dataset.i18n = note;
  slot.hidden = false;
}

function fieldBlock(field, config) {
  const input = createControl(field, config);
  const label = el("label", { htmlFor: field.name, dataset: { i18n: `field.${field.name}` } });
  const parts = field.kind === "checkbox" ? [el("div", { className: "check" }, input, label)] : [label, field.slider ? withSlider(input) : input];
  return el("div", { className: `field field-${field.kind}`, dataset: { field: field.name } },
    ...parts,
    el("p", { className: "hint", dataset: { i18n: `help.${field.name}` } }),
    el("p", { className: "note", hidden: true, dataset: { note: field.name } }),
    el("p", { className: "field-error", role: "alert", hidden: true, dataset: { fieldError: field.name } }),
  );
}

function createControl(field, config) {
  const props = { id: field.name, name: field.name };
  const parameter = config.parameters.find(({ name }) => name === field.name);
  switch (field.kind) {
    case "select":
      return el("select", props, ...parameter.choices.map(option));
    case "textarea":
      return el("textarea", { ...props, rows: 3, placeholder: parameter.empty_means });
    case "checkbox":
      return el("input", { ...props, type: "checkbox" });
    case "integer":
      return el("input", { ...props, type: "text", inputMode: "numeric", autocomplete: "off" });
    default: {
      const max = config.limits[LIMITS[field.name]] ?? parameter.le;
      return el("input", { ...props, type: "number", min: lowest(parameter, field.step), max, step: field.step });
    }
  }
}

/** A choice as an <option>; the empty one (no LoRA adapter) is labelled in the page's language. */
function option(choice) {
  return choice === "" ? el("option", { value: "", dataset: { i18n: "choice.none" } }) : el("option", { value: choice }, choice);
}

/** The smallest value a control offers: the inclusive bound, or one step above an exclusive one. */
function lowest(parameter, step) {
  return parameter.ge ?? parameter.gt + step;
}

/** A slider beside the number box, like the seed's Gradio sliders; the box holds the value. */
function withSlider(input) {
  const slider = el("input", { type: "range", min: input.min, max: input.max, step: input.step, tabIndex: -1 });
  slider.setAttribute("aria-hidden", "true");
  slider.addEventListener("input", () => {
    input.value = slider.value;
    input.dispatchEvent(new Event("input"));
  });
  input.addEventListener("input", () => {
    slider.value = input.value;
  });
  return el("div", { className: "with-slider" }, slider, input);
}

function read(field) {
  const { value, checked } = control(field.name);
  switch (field.kind) {
    case "checkbox":
      return checked;
    case "number":
      return value === "" ? undefined : Number(value);
    case "integer":
      // Not a number? Sent as typed, so the server's message names the field and what it allows.
      return INTEGER.test(value.trim()) ? exactInteger(value.trim()) : value.trim() || undefined;
    default:
      return value;
  }
}

function write(field, value) {
  const input = control(field.name);
  if (field.kind === "checkbox") input.checked = Boolean(value);
  else input.value = String(value);
  input.dispatchEvent(new Event("input"));
}
