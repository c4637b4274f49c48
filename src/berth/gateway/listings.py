"""The model lists: OpenAI's `/v1/models` in llama-swap's shape (with peers' models, selectors and the active
profile's pins), and llama-server's router-mode `/models`."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from berth.config import PORT_MACRO, ApiKey, Capabilities
from berth.engine.redact import redact_argv
from berth.gateway.access import INFERENCE, may_use_model, request_key, scope
from berth.gateway.context import GatewayContext, Routes, memory_entry
from berth.scheduler import ModelState

_ROUTER_STATUS = {
    ModelState.STOPPED: "unloaded", ModelState.FAILED: "unloaded", ModelState.STARTING: "loading",
    ModelState.READY: "loaded", ModelState.STOPPING: "loaded", ModelState.SLEEPING: "sleeping",
}


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    routes = Listings(context)
    router.add_get("/v1/models", routes.openai_models)
    router.add_get("/ui/api/models", routes.openai_models)
    router.add_get("/models", routes.router_models)


class Listings(Routes):
    @scope(INFERENCE)
    async def openai_models(self, request: web.Request) -> web.Response:
        """The models, without those the request's key may not use."""
        config = self.context.config
        key = request_key(request)
        data = []
        for spec in config.models.values():
            if spec.unlisted or not self._usable(key, spec.id):
                continue
            data.append(self._model_entry(spec.id, spec.id))
            if config.include_aliases_in_list:
                data.extend(self._model_entry(spec.id, alias) for alias in spec.aliases)
        data.extend(entry for entry in self._peer_entries() if self._usable(key, entry["id"]))
        data.extend(self._virtual_entries(key))
        return web.json_response({"object": "list", "data": data})

    def _usable(self, key: ApiKey | None, model: str) -> bool:
        return may_use_model(self.context.config, key, model)

    @scope(INFERENCE)
    async def router_models(self, request: web.Request) -> web.Response:
        data = []
        key = request_key(request)
        for spec in self.context.config.models.values():
            if spec.unlisted or not self._usable(key, spec.id):
                continue
            state = self.context.pool.state(spec.id)
            status: dict[str, Any] = {"value": _ROUTER_STATUS[state], "args": redact_argv(spec.argv)}
            if state is ModelState.FAILED:
                status["failed"] = True
            data.append({"id": spec.id, "object": "model", "owned_by": "berth", "created": self.context.started_at,
                         "aliases": list(spec.aliases), "status": status})
        return web.json_response({"object": "list", "data": data})

    def _model_entry(self, model_id: str, listed_as: str) -> dict[str, Any]:
        """One /v1/models record in llama-swap's shape (its metadata under meta.llamaswap, status,
        capabilities: declared, and `vision` for a model with a projector), with berth's `state`, `alias_of`
        and `memory` beside it."""
        spec = self.context.config.models[model_id]
        snapshot = self.context.pool.snapshot(model_id)
        state = snapshot.state
        entry: dict[str, Any] = {"id": listed_as, "object": "model", "created": self.context.started_at,
                                 "owned_by": "berth"}
        if spec.name:
            entry["name"] = spec.name.strip()
        if spec.description:
            entry["description"] = spec.description.strip()
        caps = spec.capabilities.with_image_input() if snapshot.reads_images else spec.capabilities
        declared = capability_fields(caps)
        entry.update(declared)
        running = snapshot.port if state is not ModelState.STOPPED else None
        port = running if running is not None else spec.preferred_port  # the port it has, or will try first
        listing = {k: v for k, v in bind_port(dict(spec.metadata), port).items()
                   if k not in declared}  # declared capabilities win over metadata of the same name
        if listed_as == model_id:
            listing["type"] = "model"
            if spec.aliases:
                listing["aliases"] = list(spec.aliases)
        else:
            listing.update(type="alias", modelID=model_id)
            entry["alias_of"] = model_id
        entry["meta"] = {"llamaswap": listing}
        if caps.context:
            entry["meta"]["n_ctx"] = caps.context
        entry["status"] = {"value": "loaded" if state is ModelState.READY else "unloaded"}
        entry["state"] = state.value
        entry["memory"] = memory_entry(snapshot)
        return entry

    def _peer_entries(self) -> list[dict[str, Any]]:
        return [{"id": f"{peer.id}/{model}", "object": "model", "created": self.context.started_at,
                 "owned_by": peer.id, "name": f"{peer.id}: {model}",
                 "meta": {"llamaswap": {"type": "peer", "peerID": peer.id}}, "status": {"value": "unloaded"},
                 "state": "remote"}
                for peer in self.context.config.peers.values() for model in peer.models]

    def _virtual_entries(self, key: ApiKey | None) -> list[dict[str, Any]]:
        """Selectors, and the active profile's pins that are names of their own (those with a target the
        key may use)."""
        context = self.context
        config = context.config
        virtual = [(sel.id, sel.name, sel.description, {**dict(sel.metadata), "type": "selector",
                                                        "strategy": sel.strategy, "targets": list(sel.targets)})
                   for sel in config.selectors.values() if any(self._usable(key, t) for t in sel.targets)]
        active = config.profiles.get(context.naming.active_profile(config) or "")
        if active is not None:
            virtual += [(name, "", "", {"type": "pin", "profile": active.id, "target": target})
                        for name, target in active.pins
                        if target is not None and config.resolve(name) is None and name not in config.selectors
                        and self._usable(key, target)]
        entries = []
        for virtual_id, name, description, listing in virtual:
            entry: dict[str, Any] = {"id": virtual_id, "object": "model", "created": context.started_at,
                                     "owned_by": "berth"}
            entry.update({k: v for k, v in (("name", name), ("description", description)) if v})
            entry.update(meta={"llamaswap": listing}, status={"value": "unloaded"}, state="virtual")
            entries.append(entry)
        return entries


def capability_fields(caps: Capabilities) -> dict[str, Any]:
    """A model's declared capabilities as /v1/models fields (the names OpenRouter-style clients read)."""
    fields: dict[str, Any] = {}
    if caps.empty():
        return fields
    if caps.inputs or caps.outputs:
        architecture: dict[str, Any] = {}
        if caps.inputs:
            architecture["input_modalities"] = list(caps.inputs)
        if caps.outputs:
            architecture["output_modalities"] = list(caps.outputs)
        if caps.inputs and caps.outputs:
            architecture["modality"] = "+".join(caps.inputs) + "->" + "+".join(caps.outputs)
        fields["architecture"] = architecture
    can = {
        "vision": "image" in caps.inputs,
        "audio_transcriptions": "audio" in caps.inputs and "text" in caps.outputs,
        "audio_speech": "text" in caps.inputs and "audio" in caps.outputs,
        "image_generation": "text" in caps.inputs and "image" in caps.outputs,
        "image_to_image": "image" in caps.inputs and "image" in caps.outputs,
        "function_calling": caps.tools,
        "reranker": caps.reranker,
    }
    if any(can.values()):
        fields["capabilities"] = {name: True for name, present in can.items() if present}
    if caps.tools:
        fields["supported_parameters"] = ["tools", "tool_choice"]
    if caps.context:
        fields["context_length"] = caps.context
    return fields


def bind_port(value: Any, port: int | None) -> Any:
    """Metadata with `${PORT}` filled in: a value that is only `${PORT}` becomes the number, and text
    mentions become its digits; null, and left as written, for a model without a port."""
    if value == PORT_MACRO:
        return port
    if isinstance(value, str) and port is not None:
        return value.replace(PORT_MACRO, str(port))
    if isinstance(value, dict):
        return {k: bind_port(v, port) for k, v in value.items()}
    if isinstance(value, list):
        return [bind_port(v, port) for v in value]
    return value
