"""One prompt on a running host: submit it, follow its progress over the WebSocket, read its result.

`run_prompt` returns a RunResult whatever happened (success, a node's error, an interruption);
`RunResult.raise_for_error()` turns a failure into the runner's error with the node's message only
(the host's traceback, whose frames name the pack's files, is kept in `.error` for --verbose)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .client import HostClient
from .errors import PromptFailed, PromptRejected, RunnerError, log


def node_title(prompt: dict, nid) -> str:
    n = prompt.get(str(nid), {})
    return f"#{nid} {n.get('_meta', {}).get('title') or n.get('class_type', '?')}"


def format_node_errors(payload: dict, prompt: dict) -> str:
    """The host's validation answer (error + node_errors) as lines a user can act on."""
    out = []
    err = payload.get("error")
    if isinstance(err, dict):
        out.append(f"{err.get('type', 'error')}: {err.get('message', '')} {err.get('details', '')}".strip())
    elif err:
        out.append(str(err))
    for nid, info in (payload.get("node_errors") or {}).items():
        ctype = info.get("class_type") or prompt.get(nid, {}).get("class_type", "?")
        for e in info.get("errors", []):
            detail = e.get("details") or ""
            extra = e.get("extra_info") or {}
            name = extra.get("input_name")
            out.append(f"  node #{nid} {ctype}: {e.get('message', '')}"
                       + (f" [{name}]" if name else "") + (f": {detail}" if detail else ""))
    return "\n".join(out) or json.dumps(payload)[:2000]


def error_message(error: dict, prompt: dict) -> str:
    """A node's failure as the user should read it: which node, and the exception's message."""
    message = str(error.get("exception_message", "")).strip() or "execution failed"
    return f"node {node_title(prompt, error.get('node_id', '?'))} failed: {message}"


@dataclass
class RunResult:
    prompt_id: str
    status: str                      # "success", "error" or "interrupted"
    entry: dict = field(default_factory=dict)   # the /history entry
    error: Optional[dict] = None     # the execution_error payload (exception_message, node_id, traceback ...)
    executed: list = field(default_factory=list)  # node ids that ran (not served from the cache)
    cached: list = field(default_factory=list)    # node ids the host served from its cache
    seconds: float = 0.0
    prompt: dict = field(default_factory=dict)

    @property
    def outputs(self) -> dict:
        return self.entry.get("outputs") or {}

    def files(self, kind: str = "images") -> list[dict]:
        """Output file records ({filename, subfolder, type}) of every output node, e.g. kind 'latents'."""
        return [dict(rec, node=nid) for nid, out in self.outputs.items() for rec in out.get(kind) or []]

    def message(self) -> str:
        if self.status == "interrupted":
            return "the prompt was interrupted"
        return error_message(self.error or {}, self.prompt)

    def raise_for_error(self) -> "RunResult":
        if self.status != "success":
            raise PromptFailed(self.message(), self.error)
        return self


def submit(client: HostClient, prompt: dict, client_id: str | None = None) -> str:
    """Queue the prompt; returns its id. Raises PromptRejected with the host's validation errors."""
    body = {"prompt": prompt}
    if client_id:
        body["client_id"] = client_id
    status, payload = client.post_json("/prompt", body)
    if status != 200 or payload.get("error") or "prompt_id" not in payload:
        raise PromptRejected("the host rejected the prompt:\n" + format_node_errors(payload, prompt), payload)
    return payload["prompt_id"]


async def _follow(client: HostClient, prompt: dict, timeout: float, progress: Optional[Callable[[str], None]],
                  interrupt_when: Optional[Callable[[dict], bool]], alive: Optional[Callable[[], bool]]) -> RunResult:
    client_id = uuid.uuid4().hex
    t0 = time.time()
    state = {"prompt_id": None, "status": None, "error": None, "executed": [], "cached": [], "interrupt_sent": False}
    last_progress = None

    def handle(msg: dict) -> None:
        nonlocal last_progress
        kind, data = msg.get("type"), msg.get("data") or {}
        if data.get("prompt_id") not in (None, state["prompt_id"]):
            return
        if interrupt_when is not None and not state["interrupt_sent"] and interrupt_when(msg):
            state["interrupt_sent"] = True
            state["interrupt_task"] = asyncio.ensure_future(
                client.arequest("POST", "/interrupt", json_body={"prompt_id": state["prompt_id"]}))
        if kind == "execution_cached":
            state["cached"] += [str(n) for n in data.get("nodes") or []]
            if progress and data.get("nodes"):
                progress("cached: " + ", ".join(node_title(prompt, n) for n in data["nodes"]))
        elif kind == "executing" and data.get("node") is not None:
            state["executed"].append(str(data["node"]))
            if progress:
                progress(f"[{time.time() - t0:6.1f}s] running {node_title(prompt, data['node'])}")
        elif kind == "progress" and progress:
            cur = (data.get("node"), data.get("value"), data.get("max"))
            if cur != last_progress:
                last_progress = cur
                progress(f"[{time.time() - t0:6.1f}s]   {node_title(prompt, data.get('node'))}: "
                         f"{data.get('value')}/{data.get('max')}")
        elif kind == "execution_error":
            state["status"], state["error"] = "error", data
        elif kind == "execution_interrupted":
            state["status"] = "interrupted"
            state["error"] = {"exception_message": "interrupted", "node_id": data.get("node_id")}
        elif kind == "execution_success":
            state["status"] = "success"

    events = client.events(client_id)
    try:
        first = await events.__anext__()  # the socket is open (the host greets with a status message)
        if first:
            handle(first)
        status, payload = await client.arequest("POST", "/prompt",
                                                json_body={"prompt": prompt, "client_id": client_id})
        try:
            answer = json.loads(payload) if payload else {}
        except json.JSONDecodeError:
            answer = {"raw": payload.decode(errors="replace")}
        if status != 200 or answer.get("error") or "prompt_id" not in answer:
            raise PromptRejected("the host rejected the prompt:\n" + format_node_errors(answer, prompt), answer)
        state["prompt_id"] = answer["prompt_id"]
        if progress:
            progress(f"queued prompt {state['prompt_id']} ({len(prompt)} nodes)")
        polled = time.time()
        async for msg in events:
            if msg is not None:
                handle(msg)
            if state["status"] is not None:
                break
            if time.time() - t0 > timeout:
                raise RunnerError(f"the prompt did not finish within {timeout:.0f} s")
            if alive is not None and not alive():
                raise RunnerError("ComfyUI exited while running the prompt")
            # a message lost with a dropped socket must not hang the run: look at the history now and then
            if time.time() - polled > 5:
                polled = time.time()
                status, data = await client.arequest("GET", f"/history/{state['prompt_id']}")
                if status == 200 and json.loads(data).get(state["prompt_id"]):
                    break
    finally:
        await events.aclose()
        if state.get("interrupt_task") is not None:
            await state["interrupt_task"]

    # the history entry is written right after the last message
    entry = None
    for _ in range(200):
        status, data = await client.arequest("GET", f"/history/{state['prompt_id']}")
        entry = json.loads(data).get(state["prompt_id"]) if status == 200 else None
        if entry is not None:
            break
        await asyncio.sleep(0.05)
    if entry is None:
        raise RunnerError("the host has no history for the prompt")
    st = entry.get("status") or {}
    if state["status"] is None:  # learnt from the history only
        state["status"] = "success" if st.get("status_str") == "success" else "error"
    if state["status"] != "success" and state["error"] is None:
        for m in st.get("messages", []):
            if m and m[0] == "execution_error":
                state["error"] = m[1]
            elif m and m[0] == "execution_interrupted":
                state["status"] = "interrupted"
        state["error"] = state["error"] or {"exception_message": "execution failed"}
    return RunResult(prompt_id=state["prompt_id"], status=state["status"], entry=entry, error=state["error"],
                     executed=state["executed"], cached=state["cached"], seconds=time.time() - t0, prompt=prompt)


def run_prompt(client: HostClient, prompt: dict, timeout: float = 3600.0,
               progress: Optional[Callable[[str], None]] = None,
               interrupt_when: Optional[Callable[[dict], bool]] = None,
               alive: Optional[Callable[[], bool]] = None) -> RunResult:
    """Queue `prompt` and wait for its end. `progress` gets printable lines; `interrupt_when(message)`
    is asked about every WebSocket message and, the first time it says yes, POST /interrupt is sent
    for this prompt. Raises PromptRejected when the host refuses the prompt."""
    return asyncio.run(_follow(client, prompt, timeout, progress, interrupt_when, alive))


def download_images(client: HostClient, result: RunResult, out_dir: Path) -> list[Path]:
    """Save the prompt's pictures to out_dir (previews only when nothing was saved); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = result.files("images")
    wanted = [x for x in images if x.get("type", "output") == "output"] or images
    saved = []
    for img in wanted:
        data = client.view(img["filename"], img.get("subfolder", ""), img.get("type", "output"))
        dest = out_dir / img["filename"]
        k = 1
        while dest.exists():
            dest = out_dir / f"{Path(img['filename']).stem}_{k}{Path(img['filename']).suffix}"
            k += 1
        dest.write_bytes(data)
        saved.append(dest)
        log(f"saved {dest}  (from {node_title(result.prompt, img['node'])})")
    return saved
