"""The declarations of the three ComfyUI-Kolors-MZ nodes workflows/kolors_faceid.json uses (MinusZoneAI/
ComfyUI-Kolors-MZ, __init__.py: same type names, inputs, outputs and display names), for the browser test's
host only: the front-end then draws the Kolors workflow as a user with that pack sees it (its template
thumbnail too) instead of as missing nodes. Never shipped with the pack; running these nodes is an error
(the server test runs the workflow through the stand-ins of tests/server/ipaf_test_probe/face_stand_ins.py)."""
import folder_paths

CATEGORY = "MinusZone - Kolors"


class _DeclarationOnly:
    CATEGORY = CATEGORY
    FUNCTION = "run"

    def run(self, **kwargs):
        raise RuntimeError("a declaration of a ComfyUI-Kolors-MZ node for the browser test; install that pack")


class MZ_KolorsUNETLoaderV2(_DeclarationOnly):
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list("unet"),)}}


class MZ_ChatGLM3Loader(_DeclarationOnly):
    RETURN_TYPES = ("CHATGLM3MODEL",)
    RETURN_NAMES = ("chatglm3_model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"chatglm3_checkpoint": ([],)}}


class MZ_ChatGLM3TextEncodeV2(_DeclarationOnly):
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"chatglm3_model": ("CHATGLM3MODEL",),
                             "text": ("STRING", {"multiline": True, "dynamicPrompts": True})}}


NODE_CLASS_MAPPINGS = {"MZ_KolorsUNETLoaderV2": MZ_KolorsUNETLoaderV2, "MZ_ChatGLM3Loader": MZ_ChatGLM3Loader,
                       "MZ_ChatGLM3_V2": MZ_ChatGLM3TextEncodeV2}
NODE_DISPLAY_NAME_MAPPINGS = {"MZ_KolorsUNETLoaderV2": "MinusZone - KolorsUNETLoaderV2",
                              "MZ_ChatGLM3Loader": "MinusZone - ChatGLM3Loader",
                              "MZ_ChatGLM3_V2": "MinusZone - ChatGLM3TextEncodeV2"}
