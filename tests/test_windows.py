"""The Windows GPU workstation (issue 29): what a first run there needs, and what stopping and dropping look like.

The Windows branches are pure functions with the platform (or the path flavour) as a parameter, so they run here on
Linux exactly as they would there; the rest runs the real server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import httpx
import pytest

import main
from conftest import LiveServer, free_port, make_settings, new_process_group, stop_gracefully

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(
    ("app_dir", "raw", "expected"),
    [
        (PureWindowsPath("C:/srv/llm"), "sessions.db", PureWindowsPath("C:/srv/llm/sessions.db")),
        (PureWindowsPath("C:/srv/llm"), "data\\s.db", PureWindowsPath("C:/srv/llm/data/s.db")),
        (PureWindowsPath("C:/srv/llm"), "D:\\journals\\s.db", PureWindowsPath("D:/journals/s.db")),
        (PureWindowsPath("C:/srv/llm"), "~/s.db", PureWindowsPath("~/s.db")),
        (PurePosixPath("/srv/llm"), "sessions.db", PurePosixPath("/srv/llm/sessions.db")),
        (PurePosixPath("/srv/llm"), "/var/lib/s.db", PurePosixPath("/var/lib/s.db")),
    ],
)
def test_a_relative_path_setting_lives_beside_main_py(app_dir: Any, raw: str, expected: Any) -> None:
    assert main.beside(app_dir, raw) == expected


def test_dotenv_and_the_default_journal_are_read_beside_main_py_whatever_the_working_directory(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Started from another folder (Task Scheduler, a service: C:\\Windows\\System32), `.env` used to be skipped and
    the journal opened in the working directory."""
    app = tmp_path / "app"
    app.mkdir()
    for name in ("main.py", "chat.html"):
        shutil.copy(ROOT / name, app / name)
    port = free_port()
    (app / ".env").write_text(f"PORT={port}\nMODEL_REPO_ID={tiny_model_dir}\nDEVICE_MAP=cpu\nPERSIST_SESSIONS=1\n")
    elsewhere = tmp_path / "System32"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "MODEL_REPO_ID", "PERSIST_SESSIONS")}
    proc = subprocess.Popen([sys.executable, str(app / "main.py")], cwd=elsewhere, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **new_process_group())  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start from .env"
            time.sleep(0.2)
    finally:
        stop_gracefully(proc)
        output = proc.communicate(timeout=30)[0]
    assert (app / "sessions.db").is_file() and not (elsewhere / "sessions.db").exists()
    assert f"session journal {app / 'sessions.db'} open" in output


PROACTOR_DROP = {
    "message": "Exception in callback _ProactorBasePipeTransport._call_connection_lost(None)",
    "exception": ConnectionResetError(10054, "An existing connection was forcibly closed by the remote host"),
}


@pytest.mark.parametrize(
    ("context", "platform", "dropped"),
    [
        (PROACTOR_DROP, "win32", True),
        (PROACTOR_DROP, "linux", False),  # nothing is silenced where the loop never says this
        ({**PROACTOR_DROP, "exception": OSError("disk")}, "win32", False),
        ({**PROACTOR_DROP, "message": "Exception in callback something_else()"}, "win32", False),
        ({"message": "Task exception was never retrieved"}, "win32", False),
    ],
)
def test_only_the_proactor_report_of_a_dropped_client_is_recognised(
    context: dict[str, Any], platform: str, dropped: bool
) -> None:
    assert main.is_dropped_connection(context, platform) is dropped


@pytest.mark.parametrize(("platform", "level"), [("win32", logging.DEBUG), ("linux", logging.ERROR)])
def test_the_loop_handler_logs_a_dropped_client_at_debug_on_windows_only(
    caplog: pytest.LogCaptureFixture, platform: str, level: int
) -> None:
    loop = asyncio.new_event_loop()
    try:
        main.install_loop_exception_handler(loop, platform)
        with caplog.at_level(logging.DEBUG):
            loop.call_exception_handler(dict(PROACTOR_DROP))
    finally:
        loop.close()
    [record] = [r for r in caplog.records if r.name in ("asyncio", "llm_server")]
    assert record.levelno == level


def test_shutdown_fits_inside_a_console_close_on_windows() -> None:
    whole, streams = main.shutdown_seconds("win32")
    assert whole <= 4 and streams < whole  # Windows ends a closing console's process about 5 s after the close
    assert main.shutdown_seconds("linux") == (10.0, 5.0)


@pytest.mark.parametrize(
    ("torch_version", "torch_cuda", "available", "expected"),
    [
        ("2.13.0+cpu", None, False,
         "torch 2.13.0+cpu has no CUDA support; install the CUDA build, see README: Windows and CUDA"),
        ("2.13.0+cu128", "12.8", False, "torch 2.13.0+cu128 sees no CUDA device (driver, or CUDA_VISIBLE_DEVICES?)"),
        ("2.13.0+cu128", "12.8", True, "DEVICE_MAP=cpu"),
    ],
)  # fmt: skip
def test_why_a_model_runs_on_the_cpu(
    torch_version: str, torch_cuda: str | None, available: bool, expected: str
) -> None:
    assert main.why_on_cpu(torch_version, torch_cuda, available, "cpu") == expected


@pytest.mark.parametrize(
    ("platform", "files", "on_path", "visible"),
    [
        ("win32", {"C:\\Windows\\System32\\nvcuda.dll"}, None, True),
        ("win32", set(), None, False),
        ("win32", set(), "C:\\Windows\\System32\\nvidia-smi.exe", True),
        ("linux", {"/proc/driver/nvidia/version"}, None, True),
        ("linux", set(), None, False),
    ],
)
def test_an_nvidia_gpu_is_seen_from_the_os_whatever_torch_can_use(
    platform: str, files: set[str], on_path: str | None, visible: bool
) -> None:
    found = main.nvidia_gpu_visible(platform, files.__contains__, lambda _: on_path, "C:\\Windows")
    assert found is visible


def test_the_load_log_line_and_health_say_where_the_model_runs(
    live_server: Any, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    server: LiveServer = live_server(make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu"))
    assert httpx.get(server.url + "/health", timeout=10).json()["device"] is None  # not loaded yet
    with caplog.at_level(logging.INFO, logger="llm_server"):
        httpx.post(server.url + "/v1/completions", json={"prompt": "the", "max_tokens": 1}, timeout=60)
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert (health["device"], health["dtype"]) == ("cpu", "float32")
    model = server.state.engine.handle.get().model  # type: ignore[attr-defined]
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    why = main.why_on_cpu(torch.__version__, torch.version.cuda, torch.cuda.is_available(), "cpu")
    [line] = [r.getMessage() for r in caplog.records if " loaded in " in r.getMessage()]
    assert line.endswith(f": device cpu ({why}), dtype float32, weights {weights / 2**30:.2f} GiB")


def test_a_model_load_runs_on_a_daemon_thread() -> None:
    """Python joins the default executor's threads at exit: a Ctrl+C during the first download waited for it."""
    seen: list[threading.Thread] = []

    async def load() -> str:
        return await main.in_daemon_thread(lambda: seen.append(threading.current_thread()) or "loaded")

    assert asyncio.run(load()) == "loaded"
    assert seen[0].daemon and seen[0] is not threading.main_thread()


def test_an_exception_in_a_daemon_thread_call_reaches_the_awaiting_task() -> None:
    def fail() -> None:
        raise main.ModelNotReady("no such folder")

    with pytest.raises(main.ModelNotReady, match="no such folder"):
        asyncio.run(main.in_daemon_thread(fail))
