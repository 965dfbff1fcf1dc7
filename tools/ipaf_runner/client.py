"""HTTP and WebSocket client of a running ComfyUI server, on aiohttp (a requirement of the host).

Each blocking method runs one short aiohttp session; `events()` is the async WebSocket reader
the prompt runner drives. The routes are the host's public API: /prompt, /history, /object_info,
/upload/image, /view, /interrupt, /free, /system_stats, /ws."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import AsyncIterator

from .errors import RunnerError


def _aiohttp():
    """aiohttp, imported when a request is made: the converter and the argument checks work without it."""
    try:
        import aiohttp
    except ImportError as exc:
        raise RunnerError(f"the runner needs aiohttp, one of ComfyUI's requirements ({exc}); "
                          "run it with ComfyUI's Python") from exc
    return aiohttp


class HostClient:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.base = f"http://{host}:{port}"

    # -- async core --------------------------------------------------------------------------------
    async def arequest(self, method: str, path: str, *, json_body=None, data=None,
                       timeout: float = 60.0) -> tuple[int, bytes]:
        aiohttp = _aiohttp()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.request(method, self.base + path, json=json_body, data=data) as resp:
                return resp.status, await resp.read()

    async def events(self, client_id: str, heartbeat: float = 20.0) -> AsyncIterator[dict | None]:
        """The server's JSON messages for `client_id`; None every second without one (so a caller can
        check time-outs and the process). Binary frames (previews) are skipped. Ends when the socket closes."""
        aiohttp = _aiohttp()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.base}/ws?clientId={client_id}", heartbeat=heartbeat,
                                          max_msg_size=0) as ws:
                while True:
                    try:
                        msg = await ws.receive(timeout=1.0)
                    except asyncio.TimeoutError:
                        yield None
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        try:
                            yield json.loads(msg.data)
                        except json.JSONDecodeError:
                            continue
                    elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                      aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                        return

    # -- blocking helpers ----------------------------------------------------------------------------
    def request(self, method: str, path: str, *, json_body=None, data=None, timeout: float = 60.0):
        return asyncio.run(self.arequest(method, path, json_body=json_body, data=data, timeout=timeout))

    def get_json(self, path: str, timeout: float = 60.0):
        status, data = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RunnerError(f"GET {path}: HTTP {status}: {data[:500]!r}")
        return json.loads(data)

    def post_json(self, path: str, obj, timeout: float = 60.0) -> tuple[int, dict]:
        status, data = self.request("POST", path, json_body=obj, timeout=timeout)
        try:
            payload = json.loads(data) if data else {}
        except json.JSONDecodeError:
            payload = {"raw": data.decode(errors="replace")}
        return status, payload

    def object_info(self) -> dict:
        return self.get_json("/object_info", timeout=120)

    def history(self, prompt_id: str) -> dict | None:
        """The history entry of a prompt, or None while it has none."""
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: stops the running prompt (only `prompt_id` when given)."""
        status, payload = self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        if status != 200:
            raise RunnerError(f"POST /interrupt: HTTP {status}: {payload}")

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free: the host unloads models / frees its caches before its next prompt."""
        status, payload = self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})
        if status != 200:
            raise RunnerError(f"POST /free: HTTP {status}: {payload}")

    def upload_image(self, path: Path, name: str | None = None) -> str:
        """Upload a picture to the host's input folder; returns the name a LoadImage node takes."""
        path = Path(path)
        form = _aiohttp().FormData()
        form.add_field("overwrite", "true")
        form.add_field("type", "input")
        form.add_field("image", path.read_bytes(), filename=name or path.name,
                       content_type="application/octet-stream")
        status, data = self.request("POST", "/upload/image", data=form)
        if status != 200:
            raise RunnerError(f"uploading {path} failed: HTTP {status}: {data[:300]!r}")
        info = json.loads(data)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def view(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        """The bytes of an output (or temp/input) file, through GET /view."""
        from urllib.parse import urlencode
        query = urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        status, data = self.request("GET", f"/view?{query}")
        if status != 200:
            raise RunnerError(f"could not download {filename}: HTTP {status}")
        return data

    def ready(self, timeout: float = 2.0) -> bool:
        try:
            status, _ = self.request("GET", "/system_stats", timeout=timeout)
        except (_aiohttp().ClientError, asyncio.TimeoutError, OSError):
            return False
        return status == 200
