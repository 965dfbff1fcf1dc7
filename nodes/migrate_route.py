"""POST /ipadapter_fused/migrate: the front-end action "Convert IPAdapter_plus nodes".

Body: the graph (front-end workflow JSON), or {"workflow": graph}. Answer: {"workflow": converted graph,
"report": {"converted": [...], "left": [...], "text": ...}}; 400 with {"error": ...} for what is not a
workflow. The conversion is tools/ipaf_runner/migrate.py (the same code as tools/migrate_workflow.py),
with this host's own node declarations."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROUTE = "/ipadapter_fused/migrate"
_RUNNER = Path(__file__).resolve().parents[1] / "tools" / "ipaf_runner"
_PACKAGE = "_ipadapter_fused_runner"  # a private name: tools/ is not on sys.path inside the host


def migrate_module():
    if _PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_PACKAGE, _RUNNER / "__init__.py",
                                                      submodule_search_locations=[str(_RUNNER)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[_PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(_PACKAGE + ".migrate")


def host_declarations(migrate) -> dict:
    """Every node type the host has (availability), with the declarations of those the converter writes."""
    import nodes as host_nodes

    classes = host_nodes.NODE_CLASS_MAPPINGS
    decls = migrate.declarations_from_classes({k: classes[k] for k in migrate.TARGET_NODES if k in classes})
    return {name: decls.get(name, {}) for name in classes}


def register_route() -> None:
    # The host imports its server module before it loads custom nodes; anywhere else (tests, tools, a
    # host on sys.path but not serving) there is no server to add a route to, and none is imported here.
    host_server = sys.modules.get("server")
    instance = getattr(getattr(host_server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    from aiohttp import web

    @instance.routes.post(ROUTE)
    async def migrate_route(request):
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body is not JSON; send the graph as saved by the front end"},
                                     status=400)
        graph = body.get("workflow", body) if isinstance(body, dict) else body
        migrate = migrate_module()
        try:
            converted, report = migrate.migrate(graph, host_declarations(migrate))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"workflow": converted, "report": report.as_dict()})
