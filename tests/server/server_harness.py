"""The server-test harness: one real ComfyUI server with the tiny models, API-prompt builders, and
readers for what a prompt produced. See conftest.py for the fixtures and the API in short.

It reuses the runner's package (tools/ipaf_runner): the server process, the aiohttp client and the
prompt runner are the ones `tools/run_workflow.py` uses."""
from __future__ import annotations

import itertools
import os
import sys
import tempfile
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PACK_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PACK_ROOT / "tools"))

from ipaf_runner import tiny_models  # noqa: E402
from ipaf_runner.client import HostClient  # noqa: E402
from ipaf_runner.errors import PromptRejected, RunnerError  # noqa: E402
from ipaf_runner.run import RunResult, run_prompt, submit  # noqa: E402
from ipaf_runner.server import PROBE_NODE, ComfyServer  # noqa: E402

HOST_ENV = "COMFYUI_PATH"
# A test-only custom node folder with a read-only debug route (see its docstring)
PROBE_FOLDER = Path(__file__).resolve().parent / "ipaf_test_probe"
__all__ = ["Graph", "ServerHarness", "TinyModelNames", "host_path", "PromptRejected", "RunResult", "RunnerError"]


def host_path() -> Optional[Path]:
    """$COMFYUI_PATH, else ../shared/host/ComfyUI beside the pack when it exists; None: no host."""
    env = os.environ.get(HOST_ENV)
    if env:
        return Path(env).expanduser().resolve()
    default = PACK_ROOT.parent / "shared" / "host" / "ComfyUI"
    return default.resolve() if (default / "main.py").is_file() else None


@dataclass
class TinyModelNames:
    """The names the host's loaders list for the tiny models (bind workflows to these)."""
    checkpoint: str
    clip_vision: str
    adapters: dict                 # layout ("base", "plus", "full-face") -> file name in models/ipadapter
    unet_b: str                    # diffusion_models: a second UNet, same shape, other weights
    image: str                     # the uploaded input picture (LoadImage's `image`)
    files: dict = field(default_factory=dict)  # host folder -> [paths on disk]


class Graph:
    """An API prompt under construction. `add` returns the node id; `out(id, slot)` is a link.

        g = Graph()
        ckpt = g.add("CheckpointLoaderSimple", ckpt_name=names.checkpoint)
        g.add("KSampler", model=g.out(ckpt, 0), ...)
        harness.run(g.prompt)
    """

    def __init__(self, start: int = 1):
        self.prompt: dict = {}
        self._ids = itertools.count(start)

    def add(self, class_type: str, node_id: Optional[str] = None, **inputs) -> str:
        nid = str(node_id or next(self._ids))
        self.prompt[nid] = {"class_type": class_type, "inputs": dict(inputs)}
        return nid

    @staticmethod
    def out(node_id: str, slot: int = 0) -> list:
        return [str(node_id), slot]


def sd15_graph(names: TinyModelNames, *, adapters=(), seed: int = 1, steps: int = 2, size: int = 64,
               batch: int = 1, cfg: float = 5.0, sampler: str = "euler", scheduler: str = "normal",
               prefix: str = "t", model_node: Optional[list] = None, image_node: Optional[list] = None) -> tuple:
    """The standard tiny SD1.5 graph ending in SaveLatent: checkpoint -> [apply nodes] -> KSampler.

    adapters: one dict per apply node, in chain order: {"layout": "base"|"plus"|"full-face", plus any
    IPAdapterFusedApply input (weight, weight_type, start_at, end_at, attn_mask=[node, slot], ...)}.
    Returns (Graph, ids) with ids["ckpt"], ["clip_vision"], ["image"], ["apply"] (list), ["sampler"],
    ["save"], ["latent"], ["model"] (the link the sampler's model comes from)."""
    g = Graph()
    ids = {"ckpt": g.add("CheckpointLoaderSimple", ckpt_name=names.checkpoint)}
    ids["pos"] = g.add("CLIPTextEncode", text="a photo of a red square", clip=g.out(ids["ckpt"], 1))
    ids["neg"] = g.add("CLIPTextEncode", text="blurry", clip=g.out(ids["ckpt"], 1))
    ids["latent"] = g.add("EmptyLatentImage", width=size, height=size, batch_size=batch)
    model = model_node or g.out(ids["ckpt"], 0)
    ids["apply"] = []
    if adapters:
        ids["clip_vision"] = g.add("CLIPVisionLoader", clip_name=names.clip_vision)
        ids["image"] = g.add("LoadImage", image=names.image)
        image = image_node or g.out(ids["image"], 0)
        loaders = {}
        for spec in adapters:
            spec = dict(spec)
            layout = spec.pop("layout", "base")
            if layout not in loaders:
                loaders[layout] = g.add("IPAdapterFusedLoader", ipadapter_file=names.adapters[layout])
            inputs = dict(weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat",
                          embeds_scaling="V only", middle_block="patch")
            inputs.update(spec)
            nid = g.add("IPAdapterFusedApply", model=model, ipadapter=g.out(loaders[layout]),
                        clip_vision=g.out(ids["clip_vision"]), image=image, **inputs)
            ids["apply"].append(nid)
            model = g.out(nid)
    ids["model"] = model
    ids["sampler"] = g.add("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                           scheduler=scheduler, positive=g.out(ids["pos"]), negative=g.out(ids["neg"]),
                           latent_image=g.out(ids["latent"]), denoise=1.0)
    ids["save"] = g.add("SaveLatent", samples=g.out(ids["sampler"]), filename_prefix=prefix)
    return g, ids


class ServerHarness:
    """One ComfyUI server (this pack only, CPU, temp base directory) with the tiny models in place."""

    def __init__(self, comfyui: Path, host_args=()):
        self.work = Path(tempfile.mkdtemp(prefix="ipadapter-fused-server-tests-"))
        files = tiny_models.host_models(self.work, adapters=tuple(tiny_models.ADAPTER_FILES), unet_b=True)
        self.server = ComfyServer(comfyui, cpu=True, models=files, host_args=list(host_args), say=lambda m: None,
                                  extra_custom_nodes=[PROBE_FOLDER])
        self._files = files
        self._object_info = None
        self.names: Optional[TinyModelNames] = None

    def start(self) -> "ServerHarness":
        try:
            self.server.start()
        except RunnerError:
            self.close()
            raise
        if PROBE_NODE not in self.object_info:
            raise RunnerError("the pack did not load in the host\n" + self.server.log_tail())
        image = tiny_models.make_input_image(self.work / tiny_models.SC_IMAGE)
        self.names = TinyModelNames(
            checkpoint=tiny_models.SC_CHECKPOINT, clip_vision=tiny_models.SC_CLIP_VISION,
            adapters=dict(tiny_models.ADAPTER_FILES), unet_b=tiny_models.SC_UNET_B,
            image=self.client.upload_image(image), files=self._files)
        return self

    def close(self) -> None:
        self.server.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- plumbing ------------------------------------------------------------------------------------
    @property
    def client(self) -> HostClient:
        return self.server.client

    @property
    def object_info(self) -> dict:
        if self._object_info is None:
            self._object_info = self.client.object_info()
        return self._object_info

    def refresh_object_info(self) -> dict:
        """/object_info again (after adding model files: the loaders' lists change)."""
        self._object_info = None
        return self.object_info

    def alive(self) -> bool:
        return self.server.alive()

    def log_tail(self, lines: int = 60) -> str:
        return self.server.log_tail(lines)

    def run_caches(self) -> dict:
        """{"adapters": live ImagePrompt objects, "cached": entries in their run caches} (test probe)."""
        return self.client.get_json("/ipaf_test/run_caches")

    def wait_done(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history until the prompt has an entry (finished, failed or interrupted); returns it."""
        import time
        t0 = time.time()
        while time.time() - t0 < timeout:
            entry = self.client.history(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                return entry
            time.sleep(0.1)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s\n" + self.log_tail(30))

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        import psutil
        return psutil.Process(self.server.pid).memory_info().rss

    # -- prompts -------------------------------------------------------------------------------------
    def run(self, prompt: dict, timeout: float = 600.0, interrupt_when=None) -> RunResult:
        """Queue and wait; returns the RunResult whatever its status. Raises PromptRejected when the
        host's validation refuses the prompt (`.payload` holds its node_errors)."""
        return run_prompt(self.client, prompt, timeout=timeout, interrupt_when=interrupt_when, alive=self.alive)

    def run_ok(self, prompt: dict, timeout: float = 600.0) -> RunResult:
        """run(), and a failure is an AssertionError with the node's message and the host log."""
        result = self.run(prompt, timeout)
        if result.status != "success":
            raise AssertionError(f"{result.message()}\n{''.join((result.error or {}).get('traceback') or [])}\n"
                                 + self.log_tail(30))
        return result

    def submit(self, prompt: dict) -> str:
        """Queue without waiting; returns the prompt id (see client.history(prompt_id))."""
        return submit(self.client, prompt)

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        self.client.interrupt(prompt_id)

    def free(self, unload_models: bool = True, free_memory: bool = True, keep: Optional[dict] = None) -> None:
        """POST /free, done by the time this returns.

        The host acts on /free in its queue thread after its next wait, and a prompt queued before
        that wait ends runs first. So a tiny barrier prompt is run: the flags are handled before it
        or right after it, before any later prompt. The default cache drops the outputs of nodes not
        in the current prompt; `keep` (a prompt) puts its nodes into the barrier, unconnected, so
        their cached outputs survive a /free without free_memory."""
        self.client.free(unload_models, free_memory)
        barrier = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in (keep or {}).items()
                   if self.object_info.get(v["class_type"], {}).get("output_node") is not True}
        barrier["free_barrier_latent"] = {"class_type": "EmptyLatentImage",
                                          "inputs": {"width": 16, "height": 16, "batch_size": 1}}
        barrier["free_barrier_save"] = {"class_type": "SaveLatent",
                                        "inputs": {"samples": ["free_barrier_latent", 0], "filename_prefix": "free"}}
        result = self.run(barrier)
        assert result.status == "success", result.message()

    def upload_image(self, path: Path, name: Optional[str] = None) -> str:
        return self.client.upload_image(Path(path), name)

    def add_model(self, folder: str, path: Path, name: Optional[str] = None) -> str:
        """Link a file into the server's models/<folder>; returns the name the loader lists."""
        return self.server.add_model(folder, Path(path), name)

    # -- outputs -------------------------------------------------------------------------------------
    def output_path(self, record: dict) -> Path:
        return self.server.output_dir / record.get("subfolder", "") / record["filename"]

    def latents(self, result: RunResult):
        """The tensors SaveLatent wrote for this prompt, in output-node order."""
        from safetensors.torch import load_file
        return [load_file(str(self.output_path(r)))["latent_tensor"] for r in result.files("latents")]

    def latent(self, result: RunResult):
        """The one latent the prompt saved."""
        got = self.latents(result)
        assert len(got) == 1, f"expected one saved latent, got {len(got)}: {result.outputs}"
        return got[0]

    def images(self, result: RunResult):
        """The saved pictures as uint8 arrays (H, W, 3)."""
        import numpy as np
        from PIL import Image
        return [np.asarray(Image.open(self.output_path(r)).convert("RGB")) for r in result.files("images")
                if r.get("type", "output") == "output"]
