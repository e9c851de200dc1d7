"""Schema-driven fuzzing of every endpoint (Schemathesis + Hypothesis) against the running app over real HTTP.

The app's own OpenAPI document drives it: for each operation, cases that fit the schema and cases
that break it. Whatever they send, the service answers below 500, and a 4xx is the API's error body
naming the field it refuses (`body` for the body as a whole). Queue full (429 with Retry-After) and
unknown ids (404) are fine answers.

Valid bodies create real jobs, so the app has a two-job queue, a generator kept busy by one long
job, and frame limits that keep any accepted job as cheap as that one; the synchronous endpoint
is only fuzzed with the queue full (it would otherwise wait for its video). Everything is cancelled
at the end. The count of cases tried per endpoint lands in test-artifacts/fuzz.json.
"""

import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from ray import serve
from schemathesis import GenerationMode

from conftest import deploy, tiny_args
from video_jobs import LONG, poll

MAX_PENDING = 2
EXAMPLES = 100  # per operation and generation mode
BUDGET_S = 90.0  # all operations together; each gets an equal slice
REPORT = Path(__file__).resolve().parent.parent / "test-artifacts" / "fuzz.json"


@pytest.fixture(scope="module")
def fuzz_app(serve_instance, tmp_path_factory):
    args = tiny_args(tmp_path_factory.mktemp("fuzz"), max_pending_jobs=MAX_PENDING,
                     limits={"max_frame_num": LONG["frame_num"]}, pins={"size": LONG["size"]},
                     defaults={"frame_num": LONG["frame_num"]})  # within the limit: a body without frames is valid
    app = deploy(serve_instance, "fuzz", args)
    yield app
    serve.delete(app.name)


def fill_queue(client: httpx.Client) -> None:
    """Submit long jobs until the server says 429: from then on every valid submission is refused fast."""
    while client.post("/v1/videos", json={"prompt": "queue filler", **LONG}).status_code == 202:
        pass


def cancel_everything(client: httpx.Client) -> None:
    for job in client.get("/v1/videos", params={"limit": 100}).json()["data"]:
        if job["status"] in ("queued", "in_progress"):
            client.delete(f"/v1/videos/{job['id']}")


def has_inputs(operation) -> bool:
    """Whether the operation takes anything a case could break (else negative cases cannot exist)."""
    return bool(operation.definition.raw.get("parameters") or operation.definition.raw.get("requestBody"))


def named_inputs(operation, case) -> set[str]:
    """What a 4xx may name: the operation's parameters, the body's own keys, or the body as a whole."""
    names = {"body"} | {parameter["name"] for parameter in operation.definition.raw.get("parameters", [])}
    if isinstance(case.body, dict):
        names |= set(case.body)
    schema = operation.definition.raw.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    return names | set(schema.get("properties", {}))


def check(operation, case, response) -> None:
    """`response` is Schemathesis' own: headers map to lists of values."""
    where = f"{case.method} {case.formatted_path} query={case.query} body={case.body!r:.300} -> {response.status_code}: {response.text[:500]}"
    assert response.status_code < 500, where
    if response.status_code < 400:
        return
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["message"], where
    if response.status_code == 429:
        retry_after = {name.lower(): values for name, values in response.headers.items()}["retry-after"]
        assert int(retry_after[0]) > 0, where
        return
    assert error["fields"], where
    allowed = named_inputs(operation, case)
    for item in error["fields"]:
        named = item["field"] in allowed or item["field"].split(".")[0] in allowed  # a body key may itself hold a dot
        assert named and item["message"].startswith(f"{item['field']}: "), where


def fuzz_operation(operation, mode: GenerationMode, base_url: str, until: float, before_each) -> Counter:
    """Up to EXAMPLES cases of one operation, stopping at `until`; returns the status codes seen."""
    seen = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        if time.monotonic() > until:
            return
        before_each(operation)
        response = case.call(base_url=base_url, timeout=30)
        check(operation, case, response)
        seen[response.status_code] += 1

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise  # a free-form string (an id) has no schema-breaking value: its positive cases cover it
    return seen


def test_every_endpoint_survives_schema_driven_fuzzing(fuzz_app):
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(f"{fuzz_app.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = [f"{operation.method.upper()} {operation.path}" for operation in operations]
    assert {"POST /v1/videos", "POST /v1/videos/sync", "GET /v1/videos/{video_id}/events"} <= set(labels)
    create = next(operation for operation in operations if operation.path == "/v1/videos" and operation.method == "post")
    assert create.definition.raw["requestBody"]["content"]["application/json"]["schema"]["required"] == ["prompt"]

    with fuzz_app.client(timeout=30) as client:
        blocker = client.post("/v1/videos", json={"prompt": "keeps the generator busy", **LONG}).json()
        poll(client, blocker["id"], lambda job: job["status"] == "in_progress")

        def before_each(operation):
            if operation.path == "/v1/videos/sync":
                fill_queue(client)

        per_operation, slice_s = {}, BUDGET_S / (2 * len(operations))
        try:
            for label, operation in zip(labels, operations):
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 2 if has_inputs(operation) else 1]:
                    seen = fuzz_operation(operation, mode, fuzz_app.url, time.monotonic() + slice_s, before_each)
                    per_operation.setdefault(label, Counter()).update(seen)
        finally:
            cancel_everything(client)

    total = sum(sum(seen.values()) for seen in per_operation.values())
    report = {"cases_total": total, "wall_s": round(time.monotonic() - started, 1),
              "per_endpoint": {label: {"cases": sum(seen.values()), "statuses": dict(sorted(seen.items()))} for label, seen in per_operation.items()}}
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfuzz cases tried: {json.dumps(report, indent=2)}")
    for label, operation in zip(labels, operations):  # every endpoint really fuzzed (one case is all a bare GET has)
        assert sum(per_operation[label].values()) >= (10 if has_inputs(operation) else 1), report
    accepted = per_operation["POST /v1/videos"]
    assert accepted[202] >= 1 and accepted[422] >= 1, accepted  # valid bodies got through, broken ones were refused


# Where a number belongs, what clients send instead: spellings Python's float() or int() accept (non-finite
# ones among them), spellings they refuse, strings too long to parse, lists and objects. A refusal echoes the
# value it refuses, so a non-finite float parsed from "inf" once made the error body itself unsendable (500).
NUMERIC_FIELDS = ("frame_num", "sample_steps", "sample_guide_scale", "sample_shift", "seed", "seconds")
ODD_STRINGS = ("inf", "-Infinity", "NaN", "nan", "1e400", "-1e400", "9" * 5000, "0x10", "1_0", " 5 ", "٣", "½", "1e-400", "5.", "+5", "true")
ODD_JSON = ([5], [], {"value": 5}, True, None)


def test_every_numeric_field_refuses_odd_values_with_a_4xx_naming_it(fuzz_app):
    with fuzz_app.client(timeout=30) as client:
        fill_queue(client)  # a value that happens to be valid is then refused fast (429), never run
        try:
            for field in NUMERIC_FIELDS:
                base = {"prompt": "odd numbers"}  # a spelling that is a valid value (" 5 ", "+5") then meets the full queue
                sent = [("json", json.dumps({**base, field: value})) for value in (*ODD_STRINGS, *ODD_JSON)]
                sent.append(("json", json.dumps(base)[:-1] + f', "{field}": 1e400}}'))  # a JSON number Python reads as inf
                sent += [("form", {**base, field: value}) for value in ODD_STRINGS]
                for kind, body in sent:
                    response = (client.post("/v1/videos", content=body, headers={"content-type": "application/json"}) if kind == "json"
                                else client.post("/v1/videos", data=body))
                    where = f"{kind} {field}={str(body)[:120]} -> {response.status_code}: {response.text[:300]}"
                    assert response.status_code < 500, where
                    if response.status_code in (202, 429):
                        continue  # a spelling that is a valid value (" 5 ", "+5")
                    assert 400 <= response.status_code < 500, where
                    assert [item["field"] for item in response.json()["error"]["fields"]] == [field], where
                # A form's list (the field given twice) is refused too, though each value alone is valid.
                response = client.post("/v1/videos", data={**base, field: ["5", "9"]})
                assert response.status_code == 422, f"form {field} twice -> {response.status_code}: {response.text[:300]}"
                assert [item["field"] for item in response.json()["error"]["fields"]] == [field], response.text
        finally:
            cancel_everything(client)
