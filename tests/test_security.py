"""Security at the gateway over real HTTP: API keys, CORS, the body size limit, opaque job ids.

Two apps: `secured` (keys, one CORS origin, a 4 KiB body limit) and the module's default `tiny_app`
(no keys, no CORS, the default 64 KiB limit), so each rule is seen both on and off.
"""

import os

import httpx
import pytest
from ray import serve

from conftest import deploy, tiny_args
from deployments import cli
from deployments.app import build

KEYS_ENV = "WAN_T2V_TEST_API_KEYS"
KEYS = ("first-key-0123456789", "second-key-abcdefghij")
ORIGIN = "https://studio.example"
SMALL_LIMIT = 4096
ANY_ID = "video_0123456789abcdef01234567"  # well formed, never created


@pytest.fixture(scope="module")
def secured(serve_instance, tmp_path_factory):
    """Keys are read from the environment by the builder, here in the test process (the driver)."""
    os.environ[KEYS_ENV] = ",".join(KEYS)
    try:
        args = tiny_args(tmp_path_factory.mktemp("secured"), auth={"api_keys_env": KEYS_ENV},
                         gateway={"cors_origins": [ORIGIN], "max_body_bytes": SMALL_LIMIT})
        app = deploy(serve_instance, "secured", args)
    finally:
        del os.environ[KEYS_ENV]
    yield app
    serve.delete(app.name)


def v1_routes(client: httpx.Client) -> list[tuple[str, str]]:
    """(method, path) of every /v1 operation the app itself documents, ids filled in."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path.replace("{video_id}", ANY_ID)) for path, item in paths.items() if path.startswith("/v1") for method in item]


def test_every_v1_route_needs_a_key_and_the_page_and_probes_do_not(secured):
    with secured.client() as client:
        routes = v1_routes(client)
        assert len(routes) >= 8  # the document lists the API, or this test would prove nothing
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEYS[0]}"}):
                refused = client.request(method, path, headers=headers)
                assert refused.status_code == 401, (method, path, headers, refused.text)
                assert refused.headers["www-authenticate"] == "Bearer"
                error = refused.json()["error"]
                assert error["code"] == "unauthorized" and [item["field"] for item in error["fields"]] == ["Authorization"]
        for path in ("/healthz", "/readyz", "/", "/static/app.js", "/openapi.json"):
            assert client.get(path).status_code == 200, path


def test_the_api_description_declares_the_bearer_key_for_docs_authorize_button(secured):
    with secured.client() as client:
        document = client.get("/openapi.json").json()
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert document["security"] == [{"bearer": []}]  # every operation, unless it says otherwise
    unsecured = {path for path, item in document["paths"].items() for operation in item.values() if operation.get("security") == []}
    assert unsecured == {"/healthz", "/readyz"}  # the probes RequestGuard leaves open; every /v1 route keeps the key


def test_any_configured_key_opens_the_api_and_none_leaks(secured):
    for key in KEYS:
        with httpx.Client(base_url=secured.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            assert client.get("/v1/videos").status_code == 200
            config = client.get("/v1/config")
            assert config.status_code == 200 and not any(secret in config.text for secret in KEYS)
            assert set(config.json()["model"]) == {"id", "source", "layout", "demo_model"}  # no server path
            rejected = client.post("/v1/videos", json={"prompt": "x", "frame_num": 7})
            assert rejected.status_code == 422  # past the key, the request reached validation


def test_the_cli_sends_its_key_from_the_flag_or_the_environment(secured, capsys, monkeypatch):
    monkeypatch.delenv("WAN_T2V_API_KEY", raising=False)
    assert cli.main(["--url", secured.url, "list"]) == 2
    assert "missing or wrong API key" in capsys.readouterr().err
    assert cli.main(["--url", secured.url, "--api-key", KEYS[0], "list"]) == 0
    monkeypatch.setenv("WAN_T2V_API_KEY", KEYS[1])
    assert cli.main(["--url", secured.url, "list"]) == 0


def test_a_configured_but_empty_key_variable_fails_the_build(tmp_path, monkeypatch):
    monkeypatch.setenv(KEYS_ENV, " , ")
    with pytest.raises(ValueError, match=f"auth.api_keys_env names \\${KEYS_ENV}, but it is empty or not set"):
        build(tiny_args(tmp_path, auth={"api_keys_env": KEYS_ENV}))
    monkeypatch.delenv(KEYS_ENV)
    with pytest.raises(ValueError, match=KEYS_ENV):
        build(tiny_args(tmp_path, auth={"api_keys_env": KEYS_ENV}))


def test_keys_stay_out_of_the_gateway_settings_repr(tmp_path, monkeypatch):
    monkeypatch.setenv(KEYS_ENV, ",".join(KEYS))
    gateway = build(tiny_args(tmp_path, auth={"api_keys_env": KEYS_ENV}))._bound_deployment
    settings = gateway.init_args[-1]
    assert settings.security.api_keys == KEYS
    assert not any(key in repr(settings) for key in KEYS)


def preflight(client: httpx.Client, origin: str) -> httpx.Response:
    return client.options("/v1/videos", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"})


def test_cors_answers_only_a_listed_origin(secured):
    with secured.client() as client:
        allowed = preflight(client, ORIGIN)
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-origin" not in preflight(client, "https://evil.example").headers
        refused = client.get("/v1/videos", headers={"Origin": ORIGIN})  # the page can read why it was refused
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
        assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "https://evil.example"}).headers


def test_cors_is_off_unless_configured(tiny_app):
    with tiny_app.client() as client:
        assert not any(name.startswith("access-control-") for name in preflight(client, ORIGIN).headers)
        assert "access-control-allow-origin" not in client.get("/v1/videos", headers={"Origin": ORIGIN}).headers


def chunks(size: int):
    """A body with no Content-Length: httpx sends a generator chunked."""
    body = b'{"prompt": "' + b"x" * size + b'"}'
    for start in range(0, len(body), 1000):
        yield body[start:start + 1000]


def assert_too_large(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "body_too_large" and [item["field"] for item in error["fields"]] == ["body"]
    assert f"limit of {limit} bytes" in error["message"]


@pytest.mark.parametrize("route", ["/v1/videos", "/v1/videos/sync"])
def test_an_oversized_body_is_a_413_declared_or_chunked(secured, route):
    with httpx.Client(base_url=secured.url, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30) as client:
        assert_too_large(client.post(route, json={"prompt": "x" * SMALL_LIMIT}), SMALL_LIMIT)
        assert_too_large(client.post(route, content=chunks(SMALL_LIMIT), headers={"content-type": "application/json"}), SMALL_LIMIT)
        under = client.post(route, content=chunks(3000), headers={"content-type": "application/json"})
        assert under.status_code == 422 and under.json()["error"]["fields"][0]["field"] == "prompt"  # read whole, then validated


def test_the_default_body_limit_is_64_kib(tiny_app):
    with tiny_app.client() as client:
        assert_too_large(client.post("/v1/videos", json={"prompt": "x" * 65536}), 65536)
        form = client.post("/v1/videos", data={"prompt": "x" * 65536})  # form bodies too
        assert_too_large(form, 65536)


# One path segment each once decoded (".." alone the client itself resolves, as browsers do).
MALFORMED_IDS = ["...", "video_", "video_0123456789ABCDEF01234567", "video_0123456789abcdef0123456",
                 "video_0123456789abcdef01234567x", "..%5C..%5Cjobs.db", "video_%00", "%2e%2e", "x" * 3000]
# A decoded slash makes another path: no route matches, and the id never reaches a handler.
TRAVERSALS = ["%2e%2e%2fjobs.db", "..%2F..%2Fetc%2Fpasswd"]


@pytest.mark.parametrize("suffix", ["", "/content", "/content?variant=thumbnail", "/events"])
def test_a_malformed_id_is_a_404_naming_video_id(tiny_app, suffix):
    with tiny_app.client() as client:
        for video_id in MALFORMED_IDS:
            response = client.get(f"/v1/videos/{video_id}{suffix}")
            assert response.status_code == 404, (video_id, response.text)
            assert [item["field"] for item in response.json()["error"]["fields"]] == ["video_id"], video_id
        for video_id in TRAVERSALS:
            response = client.get(f"/v1/videos/{video_id}{suffix}")
            assert response.status_code == 404 and response.json()["error"]["code"] == "http_404", response.text


def test_deleting_or_cancelling_a_malformed_id_is_a_404_naming_video_id(tiny_app):
    with tiny_app.client() as client:
        for video_id in MALFORMED_IDS:
            for response in (client.delete(f"/v1/videos/{video_id}"), client.post(f"/v1/videos/{video_id}/cancel")):
                assert response.status_code == 404 and response.json()["error"]["fields"][0]["field"] == "video_id", video_id
