"""Worker roles, one module each: what the parent does for the role's workers (its ``Role``) and
the loop they run, described by a ``RoleSpec``. A new role is one new module and one line here;
its name appears nowhere else."""

from __future__ import annotations

from collections.abc import Iterable

from splitwiser.config import EngineConfig
from splitwiser.roles import colocated, prompt, token
from splitwiser.roles.base import Role, RoleSpec, append_step, requests_per_worker

ROLES: dict[str, RoleSpec] = {}


def register(spec: RoleSpec) -> RoleSpec:
    ROLES[spec.name] = spec
    return spec


register(prompt.SPEC)
register(token.SPEC)
register(colocated.SPEC)


def workers_per_role(config: EngineConfig) -> dict[str, int]:
    """The worker processes of each role ``config`` runs."""
    return {name: n for name, spec in ROLES.items() if (n := spec.num_workers(config))}


def make_roles(config: EngineConfig, names: Iterable[str] | None = None) -> dict[str, Role]:
    """The parent sides of the roles ``names`` (default: the roles ``config`` runs), in
    scheduling order: what ``EngineCore`` routes to."""
    names = workers_per_role(config) if names is None else names
    specs = sorted((ROLES[name] for name in names), key=lambda spec: spec.schedule_rank)
    return {spec.name: spec.make(config) for spec in specs}


__all__ = [
    "ROLES",
    "Role",
    "RoleSpec",
    "append_step",
    "make_roles",
    "register",
    "requests_per_worker",
    "workers_per_role",
]
