"""One parameter source: `GenerationParams` (with ALLOWED and HELP) is the only table of generation parameters.

Every other place that shows the parameters (the API schema, both command lines, GET /v1/config and
the web page) must show the same names, defaults and ranges; each test here catches one copy drifting.
"""

import asyncio
import re
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from pydantic import ValidationError

from deployments.cli import build_parser as build_client_parser
from deployments.protocol import VideoCreateRequest
from pipeline.__main__ import CLI_ADAPTER, LORA_PATH_HELP, PLACEMENT_DEFAULTS, params_from_args
from pipeline.__main__ import build_parser as build_pipeline_parser
from pipeline.params import ALLOWED, DEFAULT_NEGATIVE_PROMPT, HELP, GenerationParams, parameter_table

WEB = Path(__file__).resolve().parent.parent / "deployments" / "web"
FIELDS = GenerationParams.model_fields
NUMERIC_BOUNDS = ("ge", "gt", "le", "lt")
# Pydantic's constraint names and the JSON Schema keywords the OpenAPI document spells them with.
SCHEMA_KEYWORDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum", "max_length": "maxLength"}
# What form.js may say about a field itself: how it is shown, never a value or a range.
PRESENTATION_KEYS = {"name", "group", "kind", "step", "slider"}
# The only numbers form.js may write: a control's step, a text box's rows, an index or a count.
JS_NUMBER = re.compile(r"(?<![\w.$])-?\d+(?:\.\d+)?(?!\w)")
PRESENTATION_NUMBER = re.compile(r"(?:(?:step|rows|tabIndex):|length ===|\[)\s*$")
JS_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


def model_default(name: str):
    return None if FIELDS[name].is_required() else FIELDS[name].default


def model_bounds(name: str) -> dict:
    """The constraints written on the field, read from pydantic's metadata (the reference every copy is held to)."""
    return {key: getattr(rule, key) for rule in FIELDS[name].metadata for key in SCHEMA_KEYWORDS if hasattr(rule, key)}


def as_words(number) -> str:
    """A bound as ALLOWED writes it: 20.0 is "20"."""
    return str(int(number)) if float(number).is_integer() else str(number)


# -- the table itself ---------------------------------------------------------------------------


def test_table_has_every_field_with_its_default_bounds_allowed_text_and_help():
    table = {row["name"]: row for row in parameter_table()}
    assert list(table) == list(FIELDS) == list(ALLOWED) == list(HELP)
    for name, row in table.items():
        assert row["default"] == model_default(name), name
        assert {key: row[key] for key in SCHEMA_KEYWORDS if key in row} == model_bounds(name), name
        assert row["allowed"] == ALLOWED[name]
        assert set(row["help"]) == {"zh", "en"} and all(row["help"].values()), name
    assert table["size"]["choices"][0] == table["size"]["default"]
    assert table["negative_prompt"]["empty_means"] == DEFAULT_NEGATIVE_PROMPT


@pytest.mark.parametrize("name", [name for name in FIELDS if model_bounds(name)])
def test_allowed_text_quotes_every_bound_and_validation_enforces_it(name):
    """ALLOWED is written by hand: it must name the field's real limits, and the limits must be the ones checked."""
    valid = {"prompt": "p"}
    for key, bound in model_bounds(name).items():
        assert re.search(rf"(?<![\d.]){re.escape(as_words(bound))}(?![\d.])", ALLOWED[name]), (name, key, bound)
        if key == "max_length":
            GenerationParams(**{**valid, name: "x" * bound})
            beyond = "x" * (bound + 1)
        else:
            if key in ("ge", "le"):
                GenerationParams(**{**valid, name: bound})
            beyond = bound - 1 if key in ("ge", "gt") else bound + 1
        with pytest.raises(ValidationError):
            GenerationParams(**{**valid, name: beyond})


# -- the HTTP API -------------------------------------------------------------------------------


def test_api_schema_offers_every_parameter_with_the_models_default_and_range():
    from deployments.gateway import app

    schema = app.openapi()["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["prompt"]
    for name in FIELDS:
        shown = schema["properties"][name]
        assert shown.get("default") == model_default(name), name
        assert {key: shown[word] for key, word in SCHEMA_KEYWORDS.items() if word in shown} == model_bounds(name), name
        assert ALLOWED[name] in shown["description"], name


def test_request_model_has_every_parameter_and_leaves_unsent_ones_to_the_server():
    request = VideoCreateRequest.model_fields
    assert set(request) - set(FIELDS) == {"model", "seconds"}
    assert request["prompt"].is_required()
    for name in FIELDS.keys() - {"prompt"}:
        assert request[name].default is None, name
        assert request[name].annotation == FIELDS[name].annotation | None, name


# -- the command lines --------------------------------------------------------------------------


def test_pipeline_cli_has_a_flag_per_parameter_with_its_allowed_text_and_default():
    parser = build_pipeline_parser()
    flags = {action.dest: action for action in parser._actions}
    assert flags["lora"].help == LORA_PATH_HELP  # a file on this machine, not a name the server serves
    for name in FIELDS.keys() - {"lora"}:
        assert ALLOWED[name] in flags[name].help, name
        shown = re.search(r"\(default: (.*)\)$", flags[name].help)
        if name in PLACEMENT_DEFAULTS:  # the model leaves these to the runner, and this command is the runner
            assert model_default(name) is None and flags[name].default == PLACEMENT_DEFAULTS[name]
        elif model_default(name) not in (None, ""):
            assert flags[name].default is None and shown and shown.group(1) == str(model_default(name)), name
    left_out = params_from_args(parser.parse_args(["--prompt", "p"]))
    assert left_out.model_dump(exclude=set(PLACEMENT_DEFAULTS)) == GenerationParams(prompt="p").model_dump(exclude=set(PLACEMENT_DEFAULTS))
    assert params_from_args(parser.parse_args(["--prompt", "p", "--lora", "styles/ink.safetensors"])).lora == CLI_ADAPTER


def test_client_generate_has_a_flag_per_parameter_that_sends_nothing_unless_given():
    commands = next(action for action in build_client_parser()._actions if action.dest == "command")
    flags = {action.dest: action for action in commands.choices["generate"]._actions}
    for name in FIELDS:
        assert ALLOWED[name] in flags[name].help, name
        if name != "prompt":
            assert flags[name].default is None, name


# -- the web page -------------------------------------------------------------------------------


def test_config_route_publishes_the_parameter_table():
    from deployments.gateway import Gateway

    config = asyncio.run(Gateway.func_or_class.config(MagicMock()))
    assert config["parameters"] == parameter_table()


def test_form_js_names_every_parameter_and_holds_no_value_range_or_default_text():
    form = (WEB / "form.js").read_text()
    fields = re.findall(r"\{ (name: \"\w+\".*?) \}", form)
    assert {re.match(r'name: "(\w+)"', field).group(1) for field in fields} == set(FIELDS)
    for field in fields:
        assert set(re.findall(r"(\w+):", field)) <= PRESENTATION_KEYS, field
    code = JS_COMMENT.sub("", form)
    for number in JS_NUMBER.finditer(code):
        line = code[: number.start()].rpartition("\n")[2]
        assert PRESENTATION_NUMBER.search(line), f"form.js writes a number that is not presentation: {line}{number[0]}"
    assert not any(phrase in form for phrase in DEFAULT_NEGATIVE_PROMPT.split("，"))


def test_i18n_js_holds_no_parameter_help():
    texts = (WEB / "i18n.js").read_text()
    assert '"help.' not in texts
    assert not any(help_text[language] in texts for help_text in HELP.values() for language in ("zh", "en"))
