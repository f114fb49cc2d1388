"""Prompt skills: the shipped seeds, open preflight reads, search, render and PI edits."""

from __future__ import annotations

import re

import pytest

from experiments import skills
from experiments.models import PromptSkill

SHIPPED = {
    "plan_mode",
    "wild_v2_planning",
    "wild_v2_iteration",
    "wild_v2_execution_ops_protocol",
    "plan_runs",
}
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def test_shipped_skills_are_complete():
    shipped = skills.shipped_skills()
    assert SHIPPED <= set(shipped)
    for skill_id in SHIPPED:
        skill = shipped[skill_id]
        assert skill.name.strip() and skill.description.strip() and skill.category.strip()
        assert skill.variables and len(skill.variables) == len(set(skill.variables))
        used = set(PLACEHOLDER.findall(skill.template))
        assert used, skill_id
        assert used <= set(skill.variables), (skill_id, used - set(skill.variables))
        assert not skill.template.startswith("---")  # front matter is not in the template


def test_anonymous_list(anon):
    response = anon.get("/api/prompt-skills")
    assert response.status_code == 200
    rows = {row["id"]: row for row in response.json()}
    assert SHIPPED <= set(rows)
    for skill_id in SHIPPED:
        row = rows[skill_id]
        assert {"id", "name", "description", "category", "variables"} <= set(row)
        assert "template" not in row
        assert row["variables"] == skills.shipped_skills()[skill_id].variables


@pytest.mark.parametrize(
    "path",
    [
        "/api/prompt-skills/wild_v2_execution_ops_protocol",
        "/api/prompt-skills/wild_v2_execution_ops_protocol/",
    ],
)
def test_anonymous_retrieve_includes_template(anon, path):
    response = anon.get(path)
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == "wild_v2_execution_ops_protocol"
    assert body["template"] == skills.shipped_skills()["wild_v2_execution_ops_protocol"].template
    assert "{{server_url}}" in body["template"] and body["source"] == "repository"


def test_unknown_skill_is_json_404(anon):
    response = anon.get("/api/prompt-skills/nope")
    assert response.status_code == 404
    assert response.json() == {"detail": "Prompt skill not found: nope"}


# --- search ------------------------------------------------------------------------------


def test_search_ranks_plan_skills_first(member):
    response = member.client.get("/api/prompt-skills/search?q=plan")
    assert response.status_code == 200
    results = response.json()
    assert results[0]["id"] in {"plan_mode", "plan_runs"}
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert "template" not in results[0]


def test_search_without_match_is_empty(member):
    response = member.client.get("/api/prompt-skills/search?q=zyxwvutsrq")
    assert response.status_code == 200 and response.json() == []


@pytest.mark.parametrize("query", ["", "?q=", "?q=%20%20"])
def test_search_without_q_is_400(member, query):
    response = member.client.get(f"/api/prompt-skills/search{query}")
    assert response.status_code == 400 and response.json()["detail"].startswith("q")


# --- render ------------------------------------------------------------------------------


def test_render_ops_protocol_fills_server_values(member):
    response = member.client.post(
        "/api/prompt-skills/wild_v2_execution_ops_protocol/render", {}, format="json"
    )
    assert response.status_code == 200
    body = response.json()
    text = body["rendered"]
    assert body["missing"] == []
    assert "{{" not in text
    assert 'curl -sf -o /dev/null "http://testserver/api/$p"' in text
    assert f'-H "X-Auth-Token: {member.token}"' in text
    catalog_lines = set(text.splitlines())
    for op in (
        "POST /api/runs",
        "GET /api/runs",
        "POST /api/sweeps/wild",
        "GET /api/wild/v2/events/{session_id}",
        "POST /api/plans/{id}/approve",
    ):
        assert any(line.startswith(op + " ") for line in catalog_lines), op
    assert not any(line.startswith("POST /api/runs/ ") for line in catalog_lines)


def test_render_fills_caller_variables(member):
    response = member.client.post(
        "/api/prompt-skills/plan_mode/render",
        {"variables": {"goal": "Beat the CIFAR-10 baseline", "session_id": "sess-42"}},
        format="json",
    )
    assert response.status_code == 200
    body = response.json()
    text = body["rendered"]
    assert body["missing"] == [] and "{{" not in text
    assert "Beat the CIFAR-10 baseline" in text and '"sess-42"' in text
    assert "http://testserver/api/cluster" in text


def test_render_reports_missing_variables(member):
    body = member.client.post("/api/prompt-skills/plan_mode/render", {}, format="json").json()
    assert body["missing"] == ["goal", "session_id"]
    assert "{{server_url}}" not in body["rendered"] and "{{goal}}" in body["rendered"]


def test_render_uses_the_callers_token(member, other):
    text = other.client.post(
        "/api/prompt-skills/wild_v2_execution_ops_protocol/render", {}, format="json"
    ).json()["rendered"]
    assert other.token in text and member.token not in text


# --- edits -------------------------------------------------------------------------------


def test_pi_edit_is_served_afterwards(pi, anon, member):
    new_template = "Edited: call {{server_url}}/runs with {{auth_header}}"
    response = pi.client.patch(
        "/api/prompt-skills/plan_mode",
        {"template": new_template, "description": "edited by carol"},
        format="json",
    )
    assert response.status_code == 200
    assert response.json()["source"] == "edited"
    row = PromptSkill.objects.get(pk="plan_mode")
    assert row.template == new_template and row.updated_by == pi.user
    assert row.name == skills.shipped_skills()["plan_mode"].name  # untouched fields kept

    served = anon.get("/api/prompt-skills/plan_mode").json()
    assert served["template"] == new_template and served["source"] == "edited"
    assert served["description"] == "edited by carol"
    listed = {r["id"]: r for r in anon.get("/api/prompt-skills").json()}
    assert listed["plan_mode"]["source"] == "edited"
    assert listed["plan_runs"]["source"] == "repository"

    rendered = member.client.post("/api/prompt-skills/plan_mode/render", {}, format="json")
    assert rendered.json()["rendered"] == (
        f'Edited: call http://testserver/api/runs with -H "X-Auth-Token: {member.token}"'
    )


def test_member_edit_is_403_and_changes_nothing(member, anon):
    before = anon.get("/api/prompt-skills/plan_mode").json()
    response = member.client.patch(
        "/api/prompt-skills/plan_mode", {"template": "pwned"}, format="json"
    )
    assert response.status_code == 403 and response.json()["detail"]
    assert not PromptSkill.objects.exists()
    assert anon.get("/api/prompt-skills/plan_mode").json() == before
