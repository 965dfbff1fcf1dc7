"""ComfyUI glue. Host modules are imported only when the host runs the pack."""
from .ipadapter_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


def _register_with_host() -> None:
    try:
        import folder_paths  # noqa: F401  (present only inside ComfyUI)
    except ImportError:
        return
    from .loaders import register_folder
    register_folder()
    from .face_nodes import register_folder as register_insightface_folder  # models/insightface
    register_insightface_folder()
    from .migrate_route import register_route  # "Convert IPAdapter_plus nodes" (web/js)
    register_route()


_register_with_host()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
