// The parameter controls: built from one table, prefilled with what the server would use, locked
// where the server decides, read into a request, and filled back from a job's parameters.

import { exactInteger } from "./api.js";
import { $, el } from "./dom.js";

// The official Wan2.1 default negative prompt (pipeline/params.py): the server uses it when the box
// is left empty, so the box shows it as its placeholder.
const DEFAULT_NEGATIVE_PROMPT =
  "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，" +
  "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，" +
  "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走";

// The seed's defaults and ranges; the server validates them (pipeline/params.py) and says what is wrong.
const FIELDS = [
  { name: "size", group: "basic", kind: "select" },
  { name: "frame_num", group: "basic", kind: "number", min: 5, max: 121, step: 4, value: 81 },
  { name: "sample_steps", group: "basic", kind: "number", min: 1, max: 100, step: 1, value: 50, slider: true },
  { name: "sample_guide_scale", group: "basic", kind: "number", min: 0, max: 20, step: 0.5, value: 6, slider: true },
  { name: "sample_shift", group: "basic", kind: "number", min: 0.5, max: 20, step: 0.5, value: 8, slider: true },
  { name: "seed", group: "basic", kind: "integer", value: -1 },
  { name: "negative_prompt", group: "basic", kind: "textarea", value: "" },
  { name: "offload_model", group: "advanced", kind: "checkbox" },
  { name: "t5_cpu", group: "advanced", kind: "checkbox" },
];
const CONTROLS = [{ name: "prompt", kind: "textarea" }, ...FIELDS]; // the prompt box is in index.html

const LIMITS = { frame_num: "max_frame_num", sample_steps: "max_sample_steps" };
const INTEGER = /^-?\d+$/;

const control = (name) => $(`#${name}`);

export function buildForm(config) {
  for (const field of FIELDS) $(`#${field.group}-fields`).append(fieldBlock(field, config));
  for (const field of CONTROLS) control(field.name).addEventListener("input", () => hideError(field.name));
  fillForm({ ...serverDefaults(config), ...config.pins });
  for (const [name, note] of Object.entries(lockedFields(config))) lock(name, note);
}

/** The request body: every enabled control's value (a blank number box is left to the server). */
export function formRequest() {
  const request = {};
  for (const field of CONTROLS) {
    const value = read(field);
    if (value !== undefined && !control(field.name).disabled) request[field.name] = value;
  }
  return request;
}

/** Puts a job's parameters back into the form; locked controls keep the server's value. */
export function fillForm(parameters) {
  for (const field of CONTROLS) {
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
  const builtIn = Object.fromEntries(FIELDS.filter((field) => "value" in field).map((field) => [field.name, field.value]));
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
  switch (field.kind) {
    case "select":
      return el("select", props, ...config.sizes.map((size) => el("option", { value: size }, size)));
    case "textarea":
      return el("textarea", { ...props, rows: 3, placeholder: DEFAULT_NEGATIVE_PROMPT });
    case "checkbox":
      return el("input", { ...props, type: "checkbox" });
    case "integer":
      return el("input", { ...props, type: "text", inputMode: "numeric", autocomplete: "off" });
    default:
      return el("input", { ...props, type: "number", min: field.min, max: config.limits[LIMITS[field.name]] ?? field.max, step: field.step });
  }
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
