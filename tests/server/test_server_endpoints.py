"""Endpoints a vLLM or KServe user scripts against: KServe v2 health, readiness and model
metadata; /v1/models with vLLM's `root`; the served name vLLM would choose; /tokenize shapes."""

from __future__ import annotations

from typing import Any

from fake_engine import FakeEngine
from server_harness import assert_error

from fuselm.config import EngineConfig
from fuselm.server.launcher import options_for_model
from fuselm.server.options import ServerOptions


def test_kserve_v2_routes(make_server: Any) -> None:
    engine = FakeEngine()
    server = make_server(engine)
    with server.client() as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}
        meta = client.get("/v2/models/fake-model").json()
        assert meta["name"] == "fake-model" and meta["platform"] == "fuselm"
        assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
        assert meta["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
        assert client.get("/v2/models/fake-model/ready").json() == {"name": "fake-model",
                                                                    "ready": True}
        assert_error(client.get("/v2/models/other"), 404)
        assert_error(client.get("/v2/models/other/ready"), 404)
        r = client.post("/v2/models/fake-model/generate",
                        json={"text_input": "hi", "parameters": {"max_tokens": 2}})
        assert r.status_code == 200 and len(r.json()["text_output"]) == 2
        server.state.draining = True
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 503
        server.state.draining = False
        server.on_loop(engine.kill)
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").json() == {"ready": False}
        assert client.get("/v2/models/fake-model/ready").status_code == 503


def test_kserve_health_is_open_with_an_api_key(make_server: Any) -> None:
    server = make_server(api_key="sk-1")
    with server.client() as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert_error(client.get("/v2/models/fake-model"), 401)
        assert client.get("/v2/models/fake-model",
                          headers={"Authorization": "Bearer sk-1"}).status_code == 200


def test_models_root_is_the_model_path(make_server: Any) -> None:
    server = make_server(served_model_name=["alias", "other"], model_root="/models/llama-3")
    with server.client() as client:
        data = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["root"], m["max_model_len"]) for m in data] == [
            ("alias", "/models/llama-3", 256), ("other", "/models/llama-3", 256)]
        assert data[0]["object"] == "model" and "owned_by" in data[0]
        assert client.get("/v1/models/other").json()["id"] == "other"
        assert_error(client.get("/v1/models/fake-model"), 404)


def test_served_name_is_the_model_string_as_in_vllm() -> None:
    config = EngineConfig(model="meta-llama/Meta-Llama-3-8B-Instruct")
    options = options_for_model(ServerOptions(), config)
    assert options.served_model_name == ("meta-llama/Meta-Llama-3-8B-Instruct",)
    assert options.model_root == "meta-llama/Meta-Llama-3-8B-Instruct"
    named = options_for_model(ServerOptions(served_model_name=("llama",)), config)
    assert named.served_model_name == ("llama",)
    assert named.model_root == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_tokenize_detokenize_shapes(fake_server: Any) -> None:
    with fake_server.client() as client:
        r = client.post("/tokenize", json={"prompt": "ab", "return_token_strs": True}).json()
        assert r == {"count": 2, "max_model_len": 256, "tokens": [100, 101],
                     "token_strs": ["a", "b"]}
        assert client.post("/detokenize", json={"tokens": [100, 101]}).json() == {"prompt": "ab"}
        assert set(client.get("/version").json()) == {"version"}
        assert_error(client.post("/tokenize", json={"prompt": "a", "tools": [{}]}), 400,
                     param="tools")
