"""Prompt skills: markdown with front matter shipped in prompt_skills/, edits kept in the DB."""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

SKILLS_DIR = Path(__file__).resolve().parent / "prompt_skills"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class SkillFormatError(ValueError):
    pass


@dataclass
class Skill:
    id: str
    name: str
    description: str
    category: str
    variables: list[str]
    template: str = field(repr=False)
    source: str = "repository"

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("template")
        return data


def parse_skill(skill_id: str, text: str) -> Skill:
    """Split `---` front matter (YAML) from the template body."""
    if not text.startswith("---"):
        raise SkillFormatError(f"{skill_id}: no front matter")
    try:
        _, head, body = text.split("---", 2)
        meta = yaml.safe_load(head) or {}
    except (ValueError, yaml.YAMLError) as exc:
        raise SkillFormatError(f"{skill_id}: bad front matter: {exc}") from exc
    if not isinstance(meta, dict) or not meta.get("name"):
        raise SkillFormatError(f"{skill_id}: front matter needs a name")
    variables = meta.get("variables") or []
    if not isinstance(variables, list) or not all(isinstance(v, str) for v in variables):
        raise SkillFormatError(f"{skill_id}: variables must be a list of names")
    return Skill(
        id=skill_id,
        name=str(meta["name"]),
        description=str(meta.get("description", "")),
        category=str(meta.get("category", "")),
        variables=variables,
        template=body.lstrip("\n"),
    )


@functools.cache
def shipped_skills() -> dict[str, Skill]:
    return {
        path.stem: parse_skill(path.stem, path.read_text(encoding="utf-8"))
        for path in sorted(SKILLS_DIR.glob("*.md"))
    }


def all_skills() -> dict[str, Skill]:
    """Shipped skills, with the edits saved in the database taking their place."""
    from experiments.models import PromptSkill

    skills = dict(shipped_skills())
    for row in PromptSkill.objects.all():
        skills[row.id] = Skill(
            id=row.id,
            name=row.name,
            description=row.description,
            category=row.category,
            variables=list(row.variables),
            template=row.template,
            source="edited",
        )
    return skills


def search(query: str) -> list[tuple[float, Skill]]:
    """Skills ranked by how well the words of the query match name, id, description, text."""
    words = [w for w in re.findall(r"[a-z0-9]+", query.lower()) if w]
    if not words:
        return []
    ranked = []
    for skill in all_skills().values():
        name = f"{skill.name} {skill.id} {skill.category}".lower()
        desc = skill.description.lower()
        body = skill.template.lower()
        score = 0.0
        for word in words:
            score += 5 * name.count(word) + 3 * desc.count(word) + min(body.count(word), 10) * 0.5
        if score > 0:
            ranked.append((score, skill))
    ranked.sort(key=lambda item: (-item[0], item[1].id))
    return ranked


def render(template: str, values: dict[str, str]) -> tuple[str, list[str]]:
    """Fill `{{var}}` placeholders; placeholders without a value are left and reported."""
    missing: list[str] = []

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in values:
            return values[name]
        missing.append(name)
        return match.group(0)

    return PLACEHOLDER.sub(fill, template), sorted(set(missing))
