"""Layer 2: the real engine (transformers) on the tiny model and on SmolLM2: streaming, cancel, loading."""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from pathlib import Path

import pytest
import torch

import main
from conftest import CancelAtCheck, build_tiny_qwen3, make_settings

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(max_new_tokens: int) -> main.GenerationParams:
    return main.GenerationParams(max_new_tokens=max_new_tokens, temperature=0)


def generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "generate"]


def test_deltas_join_to_the_plain_generate_text(tiny_engine: main.TransformersEngine) -> None:
    prompt = tiny_engine.prepare(QUESTION, greedy(24))
    events = list(tiny_engine.stream(prompt, greedy(24), threading.Event()))
    deltas = [e.text for e in events if isinstance(e, main.Delta)]
    loaded = tiny_engine.handle.get()
    reference = loaded.model.generate(**prompt.inputs, max_new_tokens=24, do_sample=False)
    expected = loaded.tokenizer.decode(reference[0, prompt.prompt_tokens :], skip_special_tokens=True)
    assert len(deltas) > 5  # really streamed, not one chunk at the end
    assert "".join(deltas) == expected
    assert events[-1] == main.Finished("length", 24)


def test_prompt_tokens_are_the_templated_prompt_length(tiny_engine: main.TransformersEngine) -> None:
    loaded = tiny_engine.handle.get()
    text = loaded.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert tiny_engine.prepare(QUESTION, greedy(1)).prompt_tokens == len(loaded.tokenizer(text)["input_ids"])


def test_cancel_stops_generate_at_the_next_token(tiny_engine: main.TransformersEngine) -> None:
    cancel = CancelAtCheck(3)
    events = list(tiny_engine.stream(tiny_engine.prepare(QUESTION, greedy(500)), greedy(500), cancel))
    finished = events[-1]
    assert isinstance(finished, main.Finished) and finished.finish_reason == "cancelled"
    assert finished.completion_tokens == 2  # looks: at admission, then before each step; set at the third
    assert generate_threads() == []


def test_closing_the_stream_early_stops_the_model_thread(tiny_engine: main.TransformersEngine) -> None:
    cancel = threading.Event()
    stream = tiny_engine.stream(tiny_engine.prepare(QUESTION, greedy(2000)), greedy(2000), cancel)
    next(stream)
    stream.close()  # what happens when the reader goes away
    assert cancel.is_set()
    assert generate_threads() == []


def test_load_failure_is_model_not_ready_and_retried(tmp_path: Path) -> None:
    target = tmp_path / "not-yet"
    engine = main.TransformersEngine(
        make_settings(model_repo_id=str(target), device_map="cpu", model_load_retry_seconds=0)
    )
    with pytest.raises(main.ModelNotReady) as caught:
        engine.load()
    assert caught.value.message == f"model {target} could not be loaded: no such file or folder: {target}"
    assert engine.load_error() == caught.value.message and not engine.is_loaded()
    build_tiny_qwen3(target)  # the model appears; the next request retries and succeeds
    engine.load()
    assert engine.is_loaded() and engine.load_error() is None


def test_a_failed_load_is_not_retried_before_model_load_retry_seconds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failure, requests get the error at once with Retry-After (no second ~25 s hub attempt each), the
    advice is logged once, and the next attempt comes when the window has passed."""
    now = [1000.0]
    target = tmp_path / "missing.gguf"
    handle = main.ModelHandle(
        make_settings(model_repo_id=str(target), model_load_retry_seconds=30), clock=lambda: now[0]
    )
    attempts: list[int] = []
    real_load = main.load_model

    def counting_load(settings: main.Settings) -> main.LoadedModel:
        attempts.append(1)
        return real_load(settings)

    with caplog.at_level(logging.INFO, logger="llm_server"):
        main.load_model = counting_load  # type: ignore[assignment]
        try:
            failures = []
            for step in (0.0, 10.0, 19.5):
                now[0] += step
                with pytest.raises(main.ModelNotReady) as caught:
                    handle.get()
                failures.append((caught.value.headers["Retry-After"], caught.value.message))
            now[0] += 0.6  # 30.1 s after the failure: tried again
            with pytest.raises(main.ModelNotReady):
                handle.get()
        finally:
            main.load_model = real_load  # type: ignore[assignment]
    error = f"model {target} could not be loaded: no such file or folder: {target}"
    assert failures == [("30", f"{error}; next attempt in 30 s"), ("20", f"{error}; next attempt in 20 s"),
                        ("1", f"{error}; next attempt in 1 s")]  # fmt: skip
    assert len(attempts) == 2
    advice = [r.getMessage() for r in caplog.records if "HF_HUB_OFFLINE=1" in r.getMessage()]
    assert advice == [f"{error}. {main.LOAD_FAILURE_ADVICE}. Requests get 503 until the next attempt, 30 s from now."]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading model")] == [
        f"loading model {target}", f"loading model {target}"]  # fmt: skip


def test_library_log_records_are_written_once() -> None:
    """huggingface_hub's own stderr handler plus propagation to ours printed every retry warning twice. After
    route_library_logs, each record is written by the root handler alone."""
    import huggingface_hub  # noqa: F401  (adds its handler on import)
    import transformers  # noqa: F401

    written: list[str] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append(record.getMessage())

    main.route_library_logs()
    root = logging.getLogger()
    counter = Count()
    root.addHandler(counter)
    try:
        for name in ("huggingface_hub.utils._http", "transformers.modeling_utils"):
            logging.getLogger(name).warning("once from %s", name)
        own = [
            h for n in main.LIBRARY_LOGGERS for h in logging.getLogger(n).handlers if type(h) is logging.StreamHandler
        ]
    finally:
        root.removeHandler(counter)
    assert own == []
    assert written == ["once from huggingface_hub.utils._http", "once from transformers.modeling_utils"]


def test_a_text_config_loads_the_causal_lm_class_without_vision(tiny_model_dir: Path) -> None:
    loaded = main.load_model(make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu"))
    assert loaded.vision is None
    assert type(loaded.model).__name__ == "Qwen3ForCausalLM"


class ToyLM(torch.nn.Module):
    """Just enough of a causal LM for `pack_linear_weights`: embeddings, a decoder of two linears and a head."""

    def __init__(self, dtype: torch.dtype, tied: bool, head: bool = True) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4, dtype=dtype)
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(4, 6, dtype=dtype), torch.nn.Linear(6, 4, bias=False, dtype=dtype)
        )
        self.head = torch.nn.Linear(4, 10, bias=False, dtype=dtype) if head else None
        if tied and self.head is not None:
            self.head.weight = self.embed.weight

    def get_decoder(self) -> torch.nn.Module:
        return self.decoder

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder(self.embed(ids))
        return hidden if self.head is None else self.head(hidden)


@pytest.mark.parametrize(
    ("model", "packed"),
    [
        (ToyLM(torch.float32, tied=False), 3),
        (ToyLM(torch.float32, tied=True), 3),
        (ToyLM(torch.bfloat16, tied=False), 0),  # measured only for float32
        (ToyLM(torch.float32, tied=False, head=False), 2),
    ],
    ids=["float32", "float32-tied", "bfloat16", "no-head"],
)
def test_pack_linear_weights(model: ToyLM, packed: int) -> None:
    ids = torch.tensor([[1, 2, 3, 9]])
    dense = weakref.ref(model.decoder[0].weight)
    with torch.inference_mode():
        before, embed = model(ids), model.embed.weight.detach().clone()
        assert main.pack_linear_weights(model) == packed
        assert main.pack_linear_weights(model) == 0  # never twice: what was packed is no plain Linear any more
        after = model(ids)
    names = [type(m).__name__ for m in (model.decoder[0], model.decoder[1], model.head) if m is not None]
    assert names == ["PackedLinear"] * len(names) if packed else ["Linear"] * 3
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.embed.weight, embed)  # a tied head was copied: the embeddings keep the dense weight
    assert (dense() is None) is bool(packed)  # a packed layer's dense weight is freed, not kept beside it


class BrokenPacking(torch.nn.Module):
    """A `PackedLinear` of a torch whose oneDNN ops are missing, fail, or compute something else."""

    def __init__(self, linear: torch.nn.Linear, fault: type[Exception] | None) -> None:
        super().__init__()
        self.linear, self.fault = linear, fault

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fault is not None:
            raise self.fault("mkldnn::_linear_pointwise: no kernel")
        return self.linear(x) + 1


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        (
            RuntimeError,
            "oneDNN linear unavailable (mkldnn::_linear_pointwise: no kernel); MKL serves the matrix products",
        ),
        (
            AttributeError,
            "oneDNN linear unavailable (mkldnn::_linear_pointwise: no kernel); MKL serves the matrix products",
        ),
        (None, "oneDNN linear disagrees with torch's; MKL serves the matrix products"),
    ],
)
def test_a_torch_whose_onednn_fails_keeps_the_model_as_loaded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fault: type[Exception] | None, said: str
) -> None:
    model = ToyLM(torch.float32, tied=False)
    monkeypatch.setattr(main, "packed_linear", lambda: lambda linear: BrokenPacking(linear, fault))
    with caplog.at_level(logging.INFO, logger="llm_server"):
        assert main.pack_linear_weights(model) == 0
    assert [type(m).__name__ for m in (model.decoder[0], model.decoder[1], model.head)] == ["Linear"] * 3
    assert [r.getMessage() for r in caplog.records] == [said]


def test_load_model_packs_the_cpu_linears_and_greedy_text_is_unchanged(tiny_model_dir: Path) -> None:
    """The packing changes which kernel multiplies, never the tokens here: a batch of 4 prompts gives the same
    greedy tokens as the model loaded by plain transformers. A conversion (`pack=False`) keeps plain linears."""
    from transformers import AutoModelForCausalLM

    loaded = main.load_model(make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu"))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    kinds = collections.Counter(type(m).__name__ for m in loaded.model.modules())
    layers = plain.config.num_hidden_layers
    assert (kinds["PackedLinear"], kinds["Linear"]) == (7 * layers + 1, 0)  # q k v o gate up down, and the head
    prompts = torch.tensor([[5, 9, 14, 3], [7, 7, 2, 30], [11, 4, 6, 8], [40, 1, 2, 3]])
    with torch.inference_mode():
        ours = loaded.model.generate(prompts, max_new_tokens=16, do_sample=False)
        theirs = plain.generate(prompts, max_new_tokens=16, do_sample=False)
    assert torch.equal(ours, theirs)
    unpacked = main.load_model(make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu"), pack=False)
    assert not any(type(m).__name__ == "PackedLinear" for m in unpacked.model.modules())


def test_smollm2_tied_head_is_packed_and_the_input_embeddings_keep_their_weights(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = main.load_model(make_settings(model_repo_id=str(smollm2_dir), device_map="cpu"))
    plain = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert type(loaded.model.get_output_embeddings()).__name__ == "PackedLinear"
    assert torch.equal(loaded.model.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    ids = torch.tensor([[1, 504, 3458, 28, 253, 1476]])
    with torch.inference_mode():
        ours, theirs = loaded.model(ids).logits, plain(ids).logits
    assert torch.allclose(ours, theirs, atol=2e-3)  # oneDNN sums in another order: float rounding only
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize(
    ("repo_id", "expected"),
    [
        ("org/model", ("org/model", {})),
        ("/models/x/model.Q4.gguf", (str(Path("/models/x")), {"gguf_file": "model.Q4.gguf"})),
        ("C:/models/m.GGUF", (str(Path("C:/models")), {"gguf_file": "m.GGUF"})),
    ],
)
def test_resolve_model_source(repo_id: str, expected: tuple[str, dict[str, str]]) -> None:
    assert main.resolve_model_source(repo_id) == expected


@pytest.mark.slow
def test_smollm2_gguf_file_loads_and_answers(smollm2_gguf: Path) -> None:
    """The real loading path for MODEL_REPO_ID=<file>.gguf, on the real model."""
    engine = main.TransformersEngine(make_settings(model_repo_id=str(smollm2_gguf), device_map="cpu"))
    prompt = engine.prepare(QUESTION, greedy(20))
    text = "".join(e.text for e in engine.stream(prompt, greedy(20), threading.Event()) if isinstance(e, main.Delta))
    assert text == "The capital of France is Paris."


def test_a_model_repos_own_code_runs_only_with_trust_remote_code(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Issue 28: trust_remote_code was hard-coded on, so any MODEL_REPO_ID ran the repo's Python."""
    import json
    import shutil

    repo = tmp_path / "custom-code-model"
    shutil.copytree(tiny_model_dir, repo)
    marker = tmp_path / "the repo's code ran"
    (repo / "configuration_custom.py").write_text(
        "from pathlib import Path\nfrom transformers import Qwen3Config\n"
        f"Path({str(marker)!r}).touch()\n\nclass CustomConfig(Qwen3Config):\n    model_type = 'qwen3'\n",
        encoding="utf-8",
    )
    config = json.loads((repo / "config.json").read_text(encoding="utf-8"))
    (repo / "config.json").write_text(
        json.dumps({**config, "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}})
    )
    assert main.Settings().trust_remote_code is False
    main.load_model(make_settings(model_repo_id=str(repo), device_map="cpu"))  # transformers' own Qwen3 classes
    assert not marker.exists()
    with pytest.raises(ValueError, match="CustomConfig"):  # its class maps to no model: what counts is that it ran
        main.load_model(make_settings(model_repo_id=str(repo), device_map="cpu", trust_remote_code=1))
    assert marker.exists()
