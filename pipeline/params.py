"""Generation parameters: the seed document's names, defaults and ranges, validated in one place.

Every layer (CLI, gateway, web page) validates through `GenerationParams`, so a bad value gets the
same message everywhere: the field, the value given and what is allowed. It is also the only table of
them: the API schema, both command lines and the web page (GET /v1/config's `parameters`) read names,
defaults, ranges and help from here (tests/test_parameter_source.py holds them to it).
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

# The official Wan2.1 default negative prompt (wan/configs/shared_config.py), verbatim.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# "width*height", as the official SIZE_CONFIGS spells them; the first is the default.
SIZES: dict[str, tuple[int, int]] = {
    "832*480": (832, 480),
    "480*832": (480, 832),
    "624*624": (624, 624),
    "704*544": (704, 544),
    "544*704": (544, 704),
}

# The samplers pipeline/sampler.py runs: the official UniPC, and two for distilled models.
SAMPLERS = ("unipc", "euler", "dmd")
# FastWan2.1-T2V-1.3B's three DMD timesteps (FastVideo, fastvideo/configs/pipelines/wan.py,
# FastWan2_1_T2V_480P_Config.dmd_denoising_steps): dmd runs one step per timestep.
DMD_TIMESTEPS = (1000, 757, 522)
DMD_STEPS = len(DMD_TIMESTEPS)

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1
# A LoRA adapter's name in the YAML's `loras:` registry (and in requests): no paths, no spaces.
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_LORA_SCALE = 2.0

# What each field accepts, in words; every rejection quotes it.
ALLOWED: dict[str, str] = {
    "prompt": f"a non-blank string of at most {MAX_PROMPT_CHARS} characters",
    "negative_prompt": f"a string of at most {MAX_PROMPT_CHARS} characters (empty = the official default)",
    "size": "one of " + ", ".join(SIZES) + " ('x' may replace '*')",
    "frame_num": "an integer 4n+1 from 5 to 121 (5, 9, 13, …, 81, …, 121)",
    "sample_solver": "unipc (the official schedule), euler (flow-matching Euler, for step-distilled LoRAs) "
    f"or dmd (denoise and renoise, for DMD-distilled checkpoints; exactly {DMD_STEPS} steps)",
    "sample_steps": f"an integer from 1 to 100 ({DMD_STEPS} with sample_solver dmd)",
    "sample_guide_scale": "a number from 0 to 20 (recommended 4–10)",
    "sample_shift": "a number above 0 and at most 20 (recommended 4–12)",
    "seed": f"-1 (draw one) or an integer from 0 to {MAX_SEED}",
    "lora": "the name (at most 64 characters) of a LoRA adapter this server serves (GET /v1/models), or empty for none",
    "lora_scale": "a number from 0 to 2 (1 = the adapter as trained, 0 = the base model)",
    "offload_model": "true or false",
    "t5_cpu": "true or false",
}

# What each field does, in the web page's two languages; the page and every --help read it from here.
HELP: dict[str, dict[str, str]] = {
    "prompt": {"zh": "视频的内容：场景、主体、动作、风格", "en": "What the video shows: scene, subjects, motion, style"},
    "negative_prompt": {
        "zh": "描述不希望出现的内容；留空则使用官方默认负面提示词（即框中灰色文字）",
        "en": "What the video should not contain; leave empty for the official default (the grey text in the box)",
    },
    "size": {"zh": "选择生成视频的分辨率（宽*高）", "en": "The video's resolution (width*height)"},
    "frame_num": {
        "zh": "须为 4n+1（5–121）；16 帧约 1 秒，81 帧约 5 秒",
        "en": "Must be 4n+1 (5–121); 16 frames ≈ 1 s, 81 frames ≈ 5 s",
    },
    "sample_solver": {
        "zh": "采样器：unipc 为官方 50 步采样；euler 与 dmd 用于蒸馏模型（4–8 步或 3 步，关闭引导）",
        "en": "The sampler: unipc is the official 50-step schedule; euler and dmd are for distilled models "
        "(4–8 or 3 steps, guidance off)",
    },
    "sample_steps": {"zh": "控制采样质量，步数越多质量越高", "en": "Controls sampling quality: more steps, higher quality"},
    "sample_guide_scale": {
        "zh": "控制文本遵循程度。低值(4-6): 生成内容更自由，可能偏离提示词但质量较高；高值(7-10): 生成内容更严格遵循提示词，但可能降低视频质量",
        "en": "How closely the video follows the prompt. Low (4-6): freer, may drift from the prompt but higher quality; "
        "high (7-10): follows the prompt more strictly, may lower video quality",
    },
    "sample_shift": {
        "zh": "控制视频动态效果。低值(4-6): 生成更平滑、静态的视频；高值(8-12): 生成更动态、变化剧烈的视频",
        "en": "Controls motion. Low (4-6): smoother, more static video; high (8-12): more dynamic video with stronger changes",
    },
    "seed": {"zh": "控制随机性，-1表示随机生成", "en": "Controls randomness; -1 draws a random seed"},
    "lora": {"zh": "LoRA 适配器（风格或蒸馏），由服务端提供；留空则使用基础模型",
             "en": "A LoRA adapter (a style or a distillation) served by this server; empty for the base model"},
    "lora_scale": {"zh": "LoRA 强度：1 为训练时的强度，0 等于基础模型", "en": "The adapter's strength: 1 as trained, 0 the base model"},
    "offload_model": {
        "zh": "将模型权重从GPU内存卸载到CPU内存，减少显存占用，但会降低推理速度",
        "en": "Moves model weights from GPU memory to CPU memory: less VRAM, slower inference",
    },
    "t5_cpu": {"zh": "将T5文本编码器放在CPU上运行，节省显存", "en": "Runs the T5 text encoder on the CPU, saving VRAM"},
}

# The constraints a field's metadata may carry (pydantic keeps Field(ge=..., max_length=...) there).
BOUNDS = ("ge", "gt", "le", "lt", "max_length")
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}
CHOICES = {"size": SIZES, "sample_solver": SAMPLERS}


class GenerationParams(BaseModel):
    """One text-to-video request, with the official Wan2.1 defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    size: str = "832*480"
    frame_num: int = Field(default=81, ge=5, le=121)
    sample_solver: str = "unipc"
    sample_steps: int = Field(default=50, ge=1, le=100, validate_default=True)  # checked against the sampler
    sample_guide_scale: float = Field(default=6.0, ge=0.0, le=20.0)
    sample_shift: float = Field(default=8.0, gt=0.0, le=20.0)
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED)
    lora: str = Field(default="", max_length=64)  # a served adapter's name; "" = none
    lora_scale: float = Field(default=1.0, ge=0.0, le=MAX_LORA_SCALE)
    # None = "whatever the serving side decides" (the replica's memory policy, the deployed encoder).
    offload_model: bool | None = None
    t5_cpu: bool | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("size", mode="before")
    @classmethod
    def _known_size(cls, value: Any) -> str:
        normalised = str(value).strip().lower().replace("x", "*").replace("×", "*")
        if normalised not in SIZES:
            raise ValueError("unknown size")
        return normalised

    @field_validator("sample_solver", mode="before")
    @classmethod
    def _known_solver(cls, value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in SAMPLERS:
            raise ValueError("unknown sampler")
        return value.strip().lower()

    @field_validator("sample_steps")
    @classmethod
    def _dmd_steps(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("sample_solver") == "dmd" and value != DMD_STEPS:
            raise ValueError(f"sample_solver dmd runs exactly {DMD_STEPS} steps")
        return value

    @field_validator("lora")
    @classmethod
    def _adapter_name(cls, value: str) -> str:
        # Which names are served is the server's to check; this only refuses what no registry can hold.
        if value and not re.match(ADAPTER_NAME, value):
            raise ValueError("not an adapter name (letters, digits, '.', '_', '-')")
        return value

    @field_validator("frame_num")
    @classmethod
    def _four_n_plus_one(cls, value: int) -> int:
        if (value - 1) % 4:
            raise ValueError("must be of the form 4n+1")
        return value

    @property
    def width(self) -> int:
        return SIZES[self.size][0]

    @property
    def height(self) -> int:
        return SIZES[self.size][1]

    @property
    def effective_negative_prompt(self) -> str:
        return self.negative_prompt if self.negative_prompt.strip() else DEFAULT_NEGATIVE_PROMPT

    def with_seed(self) -> GenerationParams:
        """A copy whose seed is concrete: -1 becomes a freshly drawn one, reported back to the user."""
        if self.seed >= 0:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})


def field_type(name: str) -> type:
    """A field's value type without the None that means "the serving side decides" (bool for t5_cpu)."""
    annotation = GenerationParams.model_fields[name].annotation
    return next((arg for arg in get_args(annotation) if arg is not type(None)), annotation)


def parameter_table(adapters: list[str] = ()) -> list[dict[str, Any]]:
    """Every generation parameter, in order, as clients show it: name, type, default, bounds, allowed text, help.

    `adapters`: the served LoRA adapters' names, the `lora` row's choices after "" (none).

    Read off `GenerationParams` so that the web page (through GET /v1/config) builds its controls from
    the model that validates, and cannot drift from it. A list of rows, not an object keyed by name:
    the page's JSON reader turns the value of every "seed" key into exact digits.
    """
    rows = [_describe_field(name, field) for name, field in GenerationParams.model_fields.items()]
    next(row for row in rows if row["name"] == "lora")["choices"] = ["", *adapters]
    return rows


def _describe_field(name: str, field: FieldInfo) -> dict[str, Any]:
    row = {
        "name": name,
        "type": JSON_TYPES[field_type(name)],
        "required": field.is_required(),
        "default": None if field.is_required() else field.default,
        **{bound: getattr(rule, bound) for rule in field.metadata for bound in BOUNDS if hasattr(rule, bound)},
        "allowed": ALLOWED[name],
        "help": HELP[name],
    }
    if name in CHOICES:
        row["choices"] = list(CHOICES[name])
    if name == "negative_prompt":
        row["empty_means"] = DEFAULT_NEGATIVE_PROMPT
    return row


def flag_help(name: str) -> str:
    """A command-line flag's help: what the parameter does, then what it accepts."""
    return f"{HELP[name]['en']}; allowed: {ALLOWED[name]}"


def field_errors(error: ValidationError, allowed: dict[str, str] = ALLOWED) -> list[dict[str, Any]]:
    """Pydantic errors as {field, value, message}; each message names field, value and allowed range.

    `allowed` maps each known field to what it accepts; callers with extra fields pass their own.
    """
    out = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or "body"
        given = item.get("input")
        reason = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = f"{field}: required; allowed: {allowed.get(field, 'see the API docs')}"
        elif item["type"] == "extra_forbidden":
            message = f"{field}: unknown field; known fields: {', '.join(allowed)}"
        else:
            shown = given if not isinstance(given, str) or len(given) <= 80 else given[:77] + "..."
            message = f"{field}: {reason} (got {shown!r}); allowed: {allowed.get(field, 'see the API docs')}"
        out.append({"field": field, "value": _jsonable(given), "message": message})
    return out


def describe_errors(error: ValidationError, allowed: dict[str, str] = ALLOWED) -> str:
    return "; ".join(item["message"] for item in field_errors(error, allowed))


def _jsonable(value: Any) -> Any:
    """The refused value as the error body can show it. JSON has no NaN or infinity, and a body that
    holds one cannot be sent: "inf", "NaN" or "1e400" (parsed to a non-finite float) is echoed as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value if not isinstance(value, str) or len(value) <= 200 else value[:200]
    return repr(value)[:200]
