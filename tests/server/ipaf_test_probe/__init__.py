"""A test-only custom node folder loaded beside the pack by the server-test harness (never shipped
with the pack): one read-only route that shows what the pack keeps between runs.

GET /ipaf_test/run_caches -> {"adapters": number of live ImagePrompt objects,
                              "cached": total entries in their per-run caches (packed K/V, masks)}
The route answers from the server's event loop, so it can be asked while a prompt samples."""
import gc

from aiohttp import web
from server import PromptServer


@PromptServer.instance.routes.get("/ipaf_test/run_caches")
async def run_caches(request):
    entries = [o for o in gc.get_objects()
               if type(o).__name__ == "ImagePrompt" and isinstance(getattr(o, "_cache", None), dict)]
    return web.json_response({"adapters": len(entries), "cached": sum(len(e._cache) for e in entries)})


from .dit_stand_ins import NODE_CLASS_MAPPINGS as _DIT_STAND_INS  # noqa: E402  (tests/server/test_dit_workflows.py)
from .face_stand_ins import NODE_CLASS_MAPPINGS as _FACE_STAND_INS  # noqa: E402  (tests/server/test_face_workflows.py)

NODE_CLASS_MAPPINGS = dict(_DIT_STAND_INS, **_FACE_STAND_INS)
NODE_DISPLAY_NAME_MAPPINGS = {}
