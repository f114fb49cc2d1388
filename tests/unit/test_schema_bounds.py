"""The schema says what the server refuses (schemathesis ST202: valid by the schema, refused by
the server): unknown body keys, a limit of 0, an empty search."""

from __future__ import annotations


def test_request_bodies_refuse_unknown_keys_and_pagination_has_its_bounds(anon):
    schema = anon.get("/api/openapi.json").json()
    components = schema["components"]["schemas"]
    assert components["RunCreateRequest"]["additionalProperties"] is False
    assert components["PlanDecisionRequest"]["additionalProperties"] is False
    assert components["RenderRequest"].get("additionalProperties") is not False
    params = {p["name"]: p["schema"] for p in schema["paths"]["/api/runs"]["get"]["parameters"]}
    assert params["limit"]["minimum"] == 1 and params["offset"]["minimum"] == 0
    logs = schema["paths"]["/api/runs/{id}/logs"]["get"]["parameters"]
    assert {p["name"]: p["schema"] for p in logs}["limit"]["maximum"] == 4 * 2**20
    search = schema["paths"]["/api/prompt-skills/search"]["get"]["parameters"]
    assert search[0]["schema"]["minLength"] == 1
