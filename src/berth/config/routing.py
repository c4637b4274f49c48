"""Which models run together and which names a request may use: groups or the matrix (llama-swap's
`routing.router`, or its older top-level keys), selectors, profiles, aliases and preloads.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from berth.config import schema
from berth.config.matrix import MatrixSyntaxError, Sets, expand as expand_sets
from berth.config.reading import Reading
from berth.config.records import DEFAULT_GROUP, BerthConfig, GroupSpec, MatrixSpec, ModelSpec
from berth.config.yamlines import LineDict

_MATRIX_VAR = re.compile(r"^[A-Za-z0-9.-]{1,32}$")
_SETTINGS = ("routing", "router", "settings")


@dataclass(frozen=True)
class Routing:
    """The groups and the matrix as written, and where (for error lines)."""

    groups: dict[str, schema.GroupConfig]
    groups_loc: tuple[str, ...]
    matrix: schema.MatrixConfig | None = None
    matrix_loc: tuple[str, ...] = ()


def read_routing(reading: Reading) -> Routing:
    """Groups and the matrix as llama-swap reads them: its current `routing.router` (where `use` picks one
    of the engines given under settings) or its older top-level `groups` / `matrix`, never both styles;
    and never groups and a matrix together."""
    p = reading.parsed
    routing_raw = reading.raw.get("routing")
    if not (isinstance(routing_raw, LineDict) and "router" in routing_raw):
        if p.groups and p.matrix is not None:
            raise reading.error(("matrix",), "a config cannot use both groups and a matrix; keep one")
        return Routing(p.groups, ("groups",), p.matrix, ("matrix",))
    if p.groups or p.matrix is not None:
        where = ("groups",) if p.groups else ("matrix",)
        raise reading.error(where, f"{where[0]} is given at the top level and routing.router too; move it under "
                                   "routing.router.settings (llama-swap's current place) and keep one")
    router = p.routing.router
    if router.use == "group":  # a matrix under settings waits unused
        return Routing(router.settings.groups, _SETTINGS + ("groups",))
    if router.settings.matrix is None:
        raise reading.error(("routing", "router", "use"), "use: matrix needs routing.router.settings.matrix "
                                                          "(vars, evict_costs, sets)")
    return Routing({}, _SETTINGS + ("groups",), router.settings.matrix, _SETTINGS + ("matrix",))


def resolve_matrix(reading: Reading, matrix: schema.MatrixConfig, loc: tuple[str, ...]) -> MatrixSpec:
    """The matrix's sets as model ids, in definition order without repeats, and its eviction costs."""
    models = reading.parsed.models
    for var, model_id in matrix.vars.items():
        if not _MATRIX_VAR.match(var):
            raise reading.error(loc + ("vars", var), "var names are 1-32 letters, digits, '-' or '.'")
        if model_id not in models:
            raise reading.error(loc + ("vars", var), f"unknown model {model_id!r}; vars name ids under models: "
                                                     "(not aliases)")

    def model_of(name: str) -> str:
        if name in matrix.vars:
            return matrix.vars[name]
        if name in models:
            return name
        raise MatrixSyntaxError(f"{name!r} is neither a var nor a model id")

    return MatrixSpec(_matrix_sets(reading, matrix, loc, model_of), _evict_costs(reading, matrix, loc, model_of))


def _matrix_sets(reading: Reading, matrix: schema.MatrixConfig, loc: tuple[str, ...],
                 model_of: Callable[[str], str]) -> tuple[frozenset[str], ...]:
    expanded: dict[str, Sets] = {}

    def set_named(name: str, trail: tuple[str, ...]) -> Sets:
        if name in trail:
            raise MatrixSyntaxError(f"sets refer to each other in a cycle: {' -> '.join(trail + (name,))}")
        if name not in matrix.sets:
            raise MatrixSyntaxError(f"+{name} names no set under sets:")
        if name not in expanded:
            expanded[name] = expand_sets(matrix.sets[name], model_of, lambda ref: set_named(ref, trail + (name,)))
        return expanded[name]

    ordered: list[frozenset[str]] = []
    for name in matrix.sets:
        try:
            found = set_named(name, ())
        except MatrixSyntaxError as exc:
            raise reading.error(loc + ("sets", name), str(exc)) from None
        ordered.extend(s for s in found if s not in ordered)
    return tuple(ordered)


def _evict_costs(reading: Reading, matrix: schema.MatrixConfig, loc: tuple[str, ...],
                 model_of: Callable[[str], str]) -> dict[str, float]:
    costs: dict[str, float] = {}
    for name, cost in matrix.evict_costs.items():
        try:
            costs[model_of(name)] = cost
        except MatrixSyntaxError as exc:
            raise reading.error(loc + ("evict_costs", name), str(exc)) from None
        if cost < 0:
            raise reading.error(loc + ("evict_costs", name), "an eviction cost cannot be negative")
    return costs


def group_membership(reading: Reading, routing: Routing) -> dict[str, str]:
    """Each model's group: the one listing it, else the (default) group."""
    group_of: dict[str, str] = {}
    for name, group in routing.groups.items():
        for i, member in enumerate(group.members):
            loc = routing.groups_loc + (name, "members", str(i))
            if member not in reading.parsed.models:
                reading.dangling(loc, member, "this member")
                continue
            if member in group_of:
                raise reading.error(loc, f"model {member!r} is already in group {group_of[member]!r}")
            group_of[member] = name
    for model_id in reading.parsed.models:
        group_of.setdefault(model_id, DEFAULT_GROUP)
    return group_of


def resolve_groups(routing: Routing, group_of: dict[str, str]) -> dict[str, GroupSpec]:
    groups = {
        name: GroupSpec(name, g.swap, g.exclusive, g.persistent,
                        tuple(m for m in g.members if group_of.get(m) == name))
        for name, g in routing.groups.items()
    }
    default_members = tuple(m for m, g in group_of.items() if g == DEFAULT_GROUP)
    if default_members:
        # As in llama-swap: ungrouped models swap among themselves and stop other groups.
        groups[DEFAULT_GROUP] = GroupSpec(DEFAULT_GROUP, True, True, False, default_members)
    return groups


def check_priorities(reading: Reading) -> None:
    for name in reading.parsed.routing.scheduler.settings.fifo.priority:
        if name not in reading.parsed.models:
            reading.dangling(("routing", "scheduler", "settings", "fifo", "priority", name), name, "its priority")


def check_aliases(reading: Reading, models: dict[str, ModelSpec]) -> None:
    owner: dict[str, str] = {}
    for spec in models.values():
        for i, alias in enumerate(spec.aliases):
            loc = ("models", spec.id, "aliases", str(i))
            if alias in models:
                raise reading.error(loc, f"alias {alias!r} is also a model id; rename one of them")
            if alias in owner:
                raise reading.error(loc, f"alias {alias!r} is already used by model {owner[alias]!r}")
            owner[alias] = spec.id


def check_virtual_ids(reading: Reading, config: BerthConfig) -> None:
    """Selectors and profile pins keep the targets that exist; a selector must not shadow a model."""
    for sid, selector in list(config.selectors.items()):
        if _known(config, sid):
            raise reading.error(("selectors", sid), f"selector id {sid!r} is also a model, alias or peer model; "
                                                    "rename the selector")
        targets = []
        for i, target in enumerate(selector.targets):
            if target in config.selectors:
                raise reading.error(("selectors", sid, "targets", str(i)), "a selector's target cannot be a selector")
            if _known(config, target):
                targets.append(target)
            else:
                reading.dangling(("selectors", sid, "targets", str(i)), target, "this target")
        if not targets:
            raise reading.error(("selectors", sid, "targets"), "none of the targets is a model, alias or peer model")
        config.selectors[sid] = replace(selector, targets=tuple(targets))
    for pid, profile in list(config.profiles.items()):
        pins = []
        for name, pinned in profile.pins:
            if pinned is not None and not _known(config, pinned) and pinned not in config.selectors:
                reading.dangling(("profiles", pid, "pins", name), pinned, "this pin")
            else:
                pins.append((name, pinned))
        config.profiles[pid] = replace(profile, pins=tuple(pins))


def _known(config: BerthConfig, name: str) -> bool:
    return config.resolve(name) is not None or config.resolve_peer(name) is not None


def preloads(reading: Reading, config: BerthConfig) -> list[str]:
    """hooks.on_startup.preload as model ids; names no model answers to are left out."""
    found = []
    for i, name in enumerate(reading.parsed.hooks.on_startup.preload):
        model_id = config.resolve(name)
        if model_id is None:
            reading.dangling(("hooks", "on_startup", "preload", str(i)), name, "this preload")
        else:
            found.append(model_id)
    return found


def return_targets(reading: Reading, config: BerthConfig) -> None:
    """Each model's `returnTo` (its own, else the top level's) as a model id."""
    top = reading.parsed.return_to
    for model_id, model in reading.parsed.models.items():
        written, loc = ((model.return_to, ("models", model_id, "returnTo")) if model.return_to is not None
                        else (top, ("returnTo",)))
        if not written:
            continue
        target = _model_id(reading, config, loc, "returnTo", written)
        if target == model_id:
            if loc[0] == "models":
                raise reading.error(loc, f"{model_id} cannot return to itself; name the model to start "
                                         "after its TTL stop, or remove returnTo")
            continue  # the top level's baseline itself: nothing to return to after its own TTL stop
        config.models[model_id] = replace(config.models[model_id], return_to=target)


def fallback_model(reading: Reading, config: BerthConfig) -> str:
    """fallbackModel as a model id (it may name an alias)."""
    name = reading.parsed.fallback_model
    if not name:
        return ""
    return _model_id(reading, config, ("fallbackModel",), "fallbackModel", name)


def _model_id(reading: Reading, config: BerthConfig, loc: tuple[str, ...], key: str, name: str) -> str:
    """The model id `name` stands for (an id or an alias), else the config error naming `key` and the ids."""
    model_id = config.resolve(name)
    if model_id is None:
        raise reading.error(loc, f"{key} names {name!r}, which is not a model id or alias here; "
                                 f"use one of: {', '.join(config.models)}")
    return model_id
