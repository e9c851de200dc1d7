// Chinese by default (the seed's Gradio page was Chinese), English on request; the choice is remembered.
// The parameters' help texts are not here: they come with the server's parameter table (addTexts).

const STORAGE_KEY = "wan-t2v.lang";

const TEXT = {
  zh: {
    title: "Wan2.1 文生视频",
    lang_toggle: "English",
    api_key: "API 密钥",
    api_key_placeholder: "服务器要求时填写",
    server_info: "模型 {model} · 内存策略 {policy} · 文本编码器 {encoders}",
    demo_banner: "演示模型：随机权重，并非 Wan2.1。生成的视频是噪声，仅用于演示整个流程。",
    prompt: "提示词",
    prompt_placeholder: "描述你想生成的视频，例如：一只红狐狸在雪地里奔跑",
    settings: "生成参数设置",
    basic: "基础参数",
    advanced: "高级优化参数",
    "field.size": "视频分辨率",
    "field.frame_num": "帧数",
    "field.sample_solver": "采样器",
    "field.sample_steps": "扩散步数",
    "field.sample_guide_scale": "引导比例",
    "field.sample_shift": "偏移比例",
    "field.seed": "随机种子",
    "field.negative_prompt": "负面提示词",
    "field.lora": "LoRA 适配器",
    "field.lora_scale": "LoRA 强度",
    "choice.none": "无（基础模型）",
    "field.offload_model": "模型卸载",
    "field.t5_cpu": "T5 CPU运行",
    "note.pinned": "由服务器命令行参数固定（界面参数的优先级低于命令行参数）",
    "note.policy": "由服务器的内存策略决定",
    "note.cpu_only": "服务器只部署了 CPU 文本编码器",
    "note.gpu_only": "服务器只部署了 GPU 文本编码器",
    generate: "生成视频",
    cancel: "取消",
    output: "生成结果",
    output_idle: "还没有任务。输入提示词后点击“生成视频”。",
    download: "下载 MP4",
    history: "最近的任务",
    history_empty: "暂无任务",
    "history.again": "用这些设置再次生成",
    "history.show": "在播放器中查看",
    "status.queued": "排队中",
    "status.in_progress": "生成中",
    "status.completed": "已完成",
    "status.failed": "失败",
    "status.cancelled": "已取消",
    "phase.starting": "启动中",
    "phase.text_encode": "编码提示词",
    "phase.denoise": "去噪",
    "phase.decode": "解码",
    "phase.write": "写入视频",
    "progress.queue": "队列第 {position} 位",
    "progress.step": "第 {step}/{total} 步",
    "progress.eta": "约剩 {seconds} 秒",
    "progress.failed": "失败：{message}",
    "progress.lost": "与服务器的进度连接已断开",
    summary: "{size} · {frame_num} 帧 · {sample_steps} 步 · 引导 {sample_guide_scale} · 偏移 {sample_shift} · 种子 {seed} · {sample_solver}",
    summary_lora: "LoRA {lora}（强度 {lora_scale}）",
    override: "{field}：请求 {requested}，实际使用 {effective}（服务器固定）",
    "error.network": "无法连接服务器：{message}",
    "error.config": "无法读取服务器配置：{message}",
    "error.key": "此服务需要 API 密钥：请在页面右上角填写正确的密钥。",
  },
  en: {
    title: "Wan2.1 text to video",
    lang_toggle: "中文",
    api_key: "API key",
    api_key_placeholder: "if the server asks for one",
    server_info: "Model {model} · memory policy {policy} · text encoder {encoders}",
    demo_banner: "Demo model: random weights, not Wan2.1. Its videos are noise; it only demonstrates the pipeline.",
    prompt: "Prompt",
    prompt_placeholder: "Describe the video, e.g. a red fox running through snow",
    settings: "Generation settings",
    basic: "Basic parameters",
    advanced: "Advanced optimisation",
    "field.size": "Resolution",
    "field.frame_num": "Frames",
    "field.sample_solver": "Sampler",
    "field.sample_steps": "Sampling steps",
    "field.sample_guide_scale": "Guidance scale",
    "field.sample_shift": "Shift",
    "field.seed": "Seed",
    "field.negative_prompt": "Negative prompt",
    "field.lora": "LoRA adapter",
    "field.lora_scale": "LoRA strength",
    "choice.none": "None (base model)",
    "field.offload_model": "Offload model",
    "field.t5_cpu": "T5 on CPU",
    "note.pinned": "Fixed by the server's command-line parameters (settings on this page rank below the command line)",
    "note.policy": "Decided by the server's memory policy",
    "note.cpu_only": "The server deploys only the CPU text encoder",
    "note.gpu_only": "The server deploys only the GPU text encoder",
    generate: "Generate video",
    cancel: "Cancel",
    output: "Result",
    output_idle: "No job yet. Enter a prompt and press “Generate video”.",
    download: "Download MP4",
    history: "Recent jobs",
    history_empty: "No jobs yet",
    "history.again": "Generate again with these settings",
    "history.show": "Show in the player",
    "status.queued": "Queued",
    "status.in_progress": "Generating",
    "status.completed": "Completed",
    "status.failed": "Failed",
    "status.cancelled": "Cancelled",
    "phase.starting": "Starting",
    "phase.text_encode": "Encoding the prompt",
    "phase.denoise": "Denoising",
    "phase.decode": "Decoding",
    "phase.write": "Writing the video",
    "progress.queue": "position {position} in the queue",
    "progress.step": "step {step}/{total}",
    "progress.eta": "about {seconds} s left",
    "progress.failed": "Failed: {message}",
    "progress.lost": "Lost the progress connection to the server",
    summary: "{size} · {frame_num} frames · {sample_steps} steps · guidance {sample_guide_scale} · shift {sample_shift} · seed {seed} · {sample_solver}",
    summary_lora: "LoRA {lora} (strength {lora_scale})",
    override: "{field}: requested {requested}, used {effective} (fixed by the server)",
    "error.network": "Cannot reach the server: {message}",
    "error.config": "Cannot read the server's configuration: {message}",
    "error.key": "This service needs an API key: enter the right one at the top of the page.",
  },
};

let current = TEXT[localStorage.getItem(STORAGE_KEY)] ? localStorage.getItem(STORAGE_KEY) : "zh";

export const language = () => current;

/** The text for `key` in the current language, with {name} placeholders filled from `vars`. */
export function t(key, vars = {}) {
  const template = TEXT[current][key] ?? key;
  return template.replace(/\{(\w+)\}/g, (_, name) => String(vars[name] ?? ""));
}

/** Adds texts for one language, e.g. the help of each parameter from GET /v1/config. */
export function addTexts(lang, texts) {
  if (lang in TEXT) Object.assign(TEXT[lang], texts);
}

export function toggleLanguage() {
  current = current === "zh" ? "en" : "zh";
  localStorage.setItem(STORAGE_KEY, current);
}

/** Fills every [data-i18n] element's text and every [data-i18n-placeholder] placeholder. */
export function translate() {
  document.documentElement.lang = current === "zh" ? "zh-CN" : "en";
  document.title = t("title");
  for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const node of document.querySelectorAll("[data-i18n-placeholder]")) node.placeholder = t(node.dataset.i18nPlaceholder);
}
