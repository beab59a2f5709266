"""A real server (uvicorn, the real app, the real journal) on a scripted engine: SCRIPTED_TOKENS tokens "t0 ",
"t1 ", ... at SCRIPTED_DELAY seconds each (timing that a real model on 2 cores cannot promise). It kills its own
process, like a segfault no shutdown code sees, whenever it streams a token of a request with max_tokens=13: the
poison request of test_continuation.py, which crashes every attempt to continue it. Run as a script:
`python crashing_server.py`, configured by the same environment variables as main.py."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent.parent), str(Path(__file__).parent)]

import uvicorn  # noqa: E402

import main  # noqa: E402
from conftest import ScriptedEngine  # noqa: E402

POISON_MAX_TOKENS = 13
CRASH_AFTER_SECONDS = 3.0  # the token is journaled meanwhile, and other requests are served


class CrashingEngine(ScriptedEngine):
    def stream(
        self, prompt: main.PreparedPrompt, params: main.GenerationParams, cancel: threading.Event,
        ends: Sequence[threading.Event] = (), resume: Sequence[main.ChoiceResume] = (),
    ) -> Iterator[main.EngineEvent]:  # fmt: skip
        for item in super().stream(prompt, params, cancel, ends, resume):
            yield item
            if params.max_new_tokens == POISON_MAX_TOKENS:
                time.sleep(CRASH_AFTER_SECONDS)
                os._exit(3)


if __name__ == "__main__":
    settings = main.Settings.from_env(os.environ)
    tokens, delay = int(os.environ.get("SCRIPTED_TOKENS", "20")), float(os.environ.get("SCRIPTED_DELAY", "0"))
    engine = CrashingEngine([f"t{i} " for i in range(tokens)], delay_seconds=delay)
    uvicorn.run(main.create_app(settings, engine), host=settings.host, port=settings.port, log_level="info")
