"""The host process: ComfyUI's main.py on 127.0.0.1, in a base directory of its own.

`--base-directory` puts models/, custom_nodes/, input/, output/, temp/ and user/ in a temp folder, so
the ComfyUI folder is only read. This pack is linked into that custom_nodes/ and, unless all custom
nodes are wanted, is the only pack loaded. Only flags that ComfyUI 0.3.64 documents in its
`--help` are passed."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from .client import HostClient
from .errors import RunnerError, log

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui-ipadapter-fused"        # [project].name in pyproject.toml
LINK_NAME = "ComfyUI-IPAdapter-Fused"        # folder name under the temp custom_nodes/
PROBE_NODE = "IPAdapterFusedApply"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_this_pack(entry: Path) -> bool:
    try:
        if entry.resolve() == PACK_ROOT:
            return True
        pyproject = entry / "pyproject.toml"
        return pyproject.is_file() and f'name = "{PACK_NAME}"' in pyproject.read_text(errors="replace")
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child before exec: end the host when the process that started it dies (Linux), so a
    killed test run or runner leaves no server behind."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def link_file(src: Path, folder: Path, name: str | None = None) -> Path:
    """Put a model file into a host folder by a symlink (a copy where links are not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / (name or Path(src).name)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    try:
        os.symlink(Path(src).resolve(), dest)
    except OSError:
        shutil.copyfile(src, dest)
    return dest


class ComfyServer:
    """A ComfyUI server started for a run or a test session.

    models: {host folder name: [files]}: each file is linked into <base>/models/<folder>/ (its own name).
    host_models: use the ComfyUI folder's own models/ (the runner on a user's install); otherwise the
    base directory's models/ holds only `models`.
    extra_custom_nodes: more custom node folders to link in and load beside this pack (test probes)."""

    def __init__(self, comfyui: Path, *, python: str = sys.executable, cpu: bool = True,
                 models: Optional[dict] = None, host_models: bool = False, all_custom_nodes: bool = False,
                 host_args: Optional[list] = None, extra_custom_nodes: Optional[list] = None, startup_timeout: float = 300.0, keep_temp: bool = False,
                 verbose: bool = False, say: Callable[[str], None] = log):
        self.comfyui = Path(comfyui).expanduser().resolve()
        self.python = python
        self.cpu = cpu
        self.models = models or {}
        self.host_models = host_models
        self.all_custom_nodes = all_custom_nodes
        self.host_args = list(host_args or [])
        self.extra_custom_nodes = [Path(p) for p in extra_custom_nodes or []]
        self.startup_timeout = startup_timeout
        self.keep_temp = keep_temp
        self.verbose = verbose
        self.say = say
        self.proc: Optional[subprocess.Popen] = None
        self.base: Optional[Path] = None
        self.port: Optional[int] = None
        self.client: Optional[HostClient] = None
        self._log_file = None

    # -- folders -------------------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.base / "host.log"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    def model_dir(self, folder: str) -> Path:
        return self.base / "models" / folder

    def add_model(self, folder: str, path: Path, name: str | None = None) -> str:
        """Link a model file into the running host's folder; returns the name its loader lists."""
        return link_file(Path(path), self.model_dir(folder), name).name

    def _prepare(self) -> list[str]:
        main_py = self.comfyui / "main.py"
        if not main_py.is_file():
            raise RunnerError(f"{self.comfyui} is not a ComfyUI folder (no main.py); pass --comfyui or set COMFYUI_PATH")
        self.base = Path(tempfile.mkdtemp(prefix="ipadapter-fused-host-"))
        for sub in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base / sub).mkdir()
        if self.host_models and (self.comfyui / "models").is_dir():
            os.symlink(self.comfyui / "models", self.base / "models", target_is_directory=True)
        else:
            (self.base / "models").mkdir()
            for folder, files in self.models.items():
                for f in files:
                    link_file(Path(f), self.model_dir(folder))
        os.symlink(PACK_ROOT, self.base / "custom_nodes" / LINK_NAME, target_is_directory=True)
        for extra in self.extra_custom_nodes:
            os.symlink(extra.resolve(), self.base / "custom_nodes" / extra.name, target_is_directory=True)
        if self.all_custom_nodes:
            for entry in sorted((self.comfyui / "custom_nodes").glob("*")):
                if entry.is_dir() and not _is_this_pack(entry):
                    os.symlink(entry.resolve(), self.base / "custom_nodes" / entry.name, target_is_directory=True)
                elif entry.is_dir():
                    self.say(f"note: {entry} is a copy of this pack; the checkout {PACK_ROOT} is loaded instead")

        self.port = free_port()
        args = ["--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base),
                # the default database lives inside the ComfyUI folder, which stays untouched
                "--database-url", "sqlite:///:memory:"]
        if not self.all_custom_nodes:
            args += ["--disable-all-custom-nodes", "--whitelist-custom-nodes", LINK_NAME,
                     *[p.name for p in self.extra_custom_nodes], "--disable-api-nodes"]
        if self.cpu:
            args.append("--cpu")
        args += self.host_args
        return [self.python, str(main_py)] + args

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        cmd = self._prepare()
        if self.verbose:
            self.say("host command: " + " ".join(cmd))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfyui), stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.client = HostClient("127.0.0.1", self.port)
        self.say(f"starting ComfyUI from {self.comfyui} on 127.0.0.1:{self.port} (log: {self.log_path})")
        t0 = time.time()
        while not self.client.ready():
            if self.proc.poll() is not None:
                raise RunnerError(f"ComfyUI exited during start-up (exit code {self.proc.returncode}).\n"
                                  + self.log_tail())
            if time.time() - t0 > self.startup_timeout:
                raise RunnerError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s.\n" + self.log_tail())
            time.sleep(0.5)
        self.say(f"ComfyUI is up after {time.time() - t0:.1f} s")
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text().rstrip().splitlines()
        return "---- host log (last %d lines) ----\n%s\n---- end of host log ----" % (
            min(lines, len(text)), "\n".join(text[-lines:]))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.base is not None:
            if self.keep_temp:
                self.say(f"kept the host's folder: {self.base}")
            else:
                shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False
