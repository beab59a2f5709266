"""Images and videos: media loading and its 400s, the tiny Qwen2.5-VL / Qwen3-VL through the engine and a live
server with the openai client, and the torchvision-free fallback (frames as images)."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import openai
import pytest
from PIL import Image

import main
from conftest import LiveServer, make_settings

TOKENS_PER_IMAGE = 4  # a 64x48 image -> grid 1x4x4 -> 16 patches / merge 2x2, for both tiny models


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def video_bytes(frames: int = 10, size: tuple[int, int] = (64, 48), container: str = "mp4") -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream("libvpx" if container == "webm" else "mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_image(Image.new("RGB", size, (i * 25 % 256, 100, 50)))
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def ask(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


# ---- a local HTTP server for media URLs -----------------------------------------------------------------------


class MediaHandler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, Callable[[MediaHandler], None]]] = {}

    def do_GET(self) -> None:
        self.routes.get(self.path, lambda h: h.send_error(404))(self)

    def log_message(self, *args: Any) -> None:
        pass


def _send(handler: MediaHandler, body: bytes, delay: float = 0.0) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    time.sleep(delay)
    handler.wfile.write(body)


def _redirect(handler: MediaHandler) -> None:
    handler.send_response(302)
    handler.send_header("Location", "/img.png")
    handler.end_headers()


MediaHandler.routes = {
    "/img.png": lambda h: _send(h, png_bytes()),
    "/slow.png": lambda h: _send(h, png_bytes(), delay=3),
    "/big.png": lambda h: _send(h, b"x" * 200_000),
    "/redirect.png": _redirect,
}


@pytest.fixture(scope="module")
def media_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MediaHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# ---- media loading: every bad input is a 400 naming the part ------------------------------------------------------

P = "messages[0].content[1]"


def load(url: str, kind: str = "image", **settings: Any) -> Any:
    return main.load_media(main.MediaRef(kind, url, P), make_settings(**settings))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "kind", "settings", "message"),
    [
        ("data:image/png;base64,!!!notbase64", "image", {}, "invalid base64 in data URL"),
        ("data:image/png,rawbytes", "image", {}, "data URLs must be base64: data:<type>;base64,<data>"),
        (data_url(b"hello, not an image"), "image", {}, "the bytes are not an image Pillow can read"),
        (data_url(png_bytes((100, 100))), "image", {"max_image_pixels": 5000},
         "image is 100x100, more than 5000 pixels"),
        (data_url(png_bytes()), "image", {"max_image_bytes": 100}, "media is larger than 100 bytes"),
        ("ftp://example.com/a.png", "image", {},
         "unsupported URL scheme 'ftp': use data:, http(s): or a file under MEDIA_ROOT"),
        ("/etc/passwd", "image", {}, "local files are not allowed (the server has no MEDIA_ROOT)"),
        ("file:///etc/passwd", "image", {}, "local files are not allowed (the server has no MEDIA_ROOT)"),
        (data_url(b"\x00\x01 not a video", "video/mp4"), "video", {}, "the bytes are not a video PyAV can decode"),
        ("http://127.0.0.1:9/a.png", "image", {}, None),  # loopback refused before any connection
        ("http://10.1.2.3/a.png", "image", {}, None),
        ("http://localhost/a.png", "image", {}, None),
    ],
)  # fmt: skip
def test_bad_media_is_a_400_naming_the_part(url: str, kind: str, settings: dict[str, Any], message: str | None) -> None:
    with pytest.raises(main.BadRequest) as caught:
        load(url, kind, **settings)
    assert caught.value.param == P and caught.value.status == 400
    if message is None:
        assert "not a public address (MEDIA_ALLOW_PRIVATE_HOSTS=1 allows it)" in caught.value.message
    else:
        assert caught.value.message == message


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = png_bytes((6000, 6000), (0, 0, 0))  # compresses to a few KB, 36 M pixels
    with pytest.raises(main.BadRequest) as caught:
        load(data_url(bomb))
    assert caught.value.message == "image is 6000x6000, more than 25000000 pixels"


@pytest.mark.parametrize(
    ("total", "wanted", "expected"),
    [(10, 4, [0, 3, 6, 9]), (3, 16, [0, 1, 2]), (100, 1, [0]), (5, 5, [0, 1, 2, 3, 4]), (0, 4, [])],
)
def test_sample_indices(total: int, wanted: int, expected: list[int]) -> None:
    assert main.sample_indices(total, wanted) == expected


@pytest.mark.parametrize("container", ["mp4", "webm", "matroska", "mov"])
def test_video_is_decoded_and_sampled_evenly(container: str) -> None:
    video = load(data_url(video_bytes(10, container=container), "video/mp4"), "video", max_video_frames=4)
    assert (video.total_frames, video.indices, len(video.frames)) == (10, [0, 3, 6, 9], 4)
    assert video.frames[0].size == (64, 48)


def test_local_files_only_under_media_root(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    assert load("a.png", media_root=root).size == (64, 48)
    assert load((root / "a.png").as_uri(), media_root=root).size == (64, 48)
    for outside in ("../secret.png", str(tmp_path / "secret.png"), (tmp_path / "secret.png").as_uri()):
        with pytest.raises(main.BadRequest) as caught:
            load(outside, media_root=root)
        assert caught.value.message == "local files must be under MEDIA_ROOT"


@pytest.mark.parametrize(
    ("path", "settings", "message"),
    [
        ("/slow.png", {"media_fetch_timeout_seconds": 0.5}, "timed out after 0.5 s"),
        ("/big.png", {"max_image_bytes": 100_000}, "is larger than 100000 bytes"),
        ("/missing.png", {}, "gave HTTP 404"),
    ],
)
def test_http_media_errors(media_url: str, path: str, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(main.BadRequest) as caught:
        load(media_url + path, media_allow_private_hosts=1, **settings)
    assert message in caught.value.message and caught.value.param == P


def test_http_media_follows_redirects(media_url: str) -> None:
    assert load(media_url + "/redirect.png", media_allow_private_hosts=1).size == (64, 48)


def test_too_many_images_names_the_first_extra_part() -> None:
    refs = [main.MediaRef("image", "x", f"messages[0].content[{i}]") for i in range(3)]
    with pytest.raises(main.BadRequest) as caught:
        main.check_media_count(refs, 2)
    assert (caught.value.message, caught.value.param) == ("too many images: 3 (at most 2 per request)", refs[2].param)


# ---- the engine on tiny vision-language models ----------------------------------------------------------------


@pytest.fixture(scope="module")
def vl_engine(tiny_vl_dir: Path) -> main.TransformersEngine:
    engine = main.TransformersEngine(
        make_settings(model_repo_id=str(tiny_vl_dir), device_map="cpu", max_video_frames=4)
    )
    engine.load()
    return engine


def placeholder_counts(engine: main.TransformersEngine, prompt: main.PreparedPrompt) -> tuple[int, int]:
    config = engine.handle.get().model.config
    ids = prompt.inputs["input_ids"][0].tolist()
    return ids.count(config.image_token_id), ids.count(config.video_token_id)


def prepare(engine: main.TransformersEngine, messages: list[dict[str, Any]]) -> main.PreparedPrompt:
    request = main.ChatCompletionRequest.model_validate({"messages": messages})
    return engine.prepare(main.to_template_messages(request.messages), main.GenerationParams(4, 0))


def test_vision_model_loads_with_the_torchvision_free_pipeline(vl_engine: main.TransformersEngine) -> None:
    loaded = vl_engine.handle.get()
    assert type(loaded.model).__name__.endswith("ForConditionalGeneration")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert isinstance(loaded.vision, main.PilVision)
    else:
        assert isinstance(loaded.vision, main.StockVision)


@pytest.mark.parametrize(
    ("parts", "images"),
    [([image_part(data_url(png_bytes()))], 1), ([image_part(data_url(png_bytes()))] * 2, 2)],
)
def test_images_become_the_right_number_of_placeholders(
    vl_engine: main.TransformersEngine, parts: list[dict[str, Any]], images: int
) -> None:
    prompt = prepare(vl_engine, ask(*parts))
    assert placeholder_counts(vl_engine, prompt) == (images * TOKENS_PER_IMAGE, 0)
    assert prompt.inputs["image_grid_thw"].tolist() == [[1, 4, 4]] * images


def test_video_without_torchvision_goes_in_as_its_sampled_frames(vl_engine: main.TransformersEngine) -> None:
    if isinstance(vl_engine.handle.get().vision, main.StockVision):
        pytest.skip("torchvision present: the native video path is tested below")
    prompt = prepare(vl_engine, ask(video_part(data_url(video_bytes(10), "video/mp4"))))
    assert placeholder_counts(vl_engine, prompt) == (4 * TOKENS_PER_IMAGE, 0)  # 4 sampled frames, never dropped


def test_video_with_torchvision_uses_the_native_video_path(vl_engine: main.TransformersEngine) -> None:
    pytest.importorskip("torchvision", reason="torchvision's PyPI wheel needs CUDA; runs on GPU workstations")
    prompt = prepare(vl_engine, ask(video_part(data_url(video_bytes(10), "video/mp4"))))
    images, videos = placeholder_counts(vl_engine, prompt)
    assert images == 0 and videos > 0 and "pixel_values_videos" in prompt.inputs


def test_vision_model_streams_what_plain_generate_produces(vl_engine: main.TransformersEngine) -> None:
    params = main.GenerationParams(6, 0)
    prompt = prepare(vl_engine, ask(image_part(data_url(png_bytes()))))
    events = list(vl_engine.stream(prompt, params, threading.Event()))
    loaded = vl_engine.handle.get()
    reference = loaded.model.generate(**prompt.inputs, max_new_tokens=6, do_sample=False)[0, prompt.prompt_tokens :]
    text = "".join(e.text for e in events if isinstance(e, main.Delta))
    assert text == loaded.tokenizer.decode(reference, skip_special_tokens=True)
    assert isinstance(events[-1], main.Finished) and events[-1].completion_tokens == len(reference)


def test_text_only_model_refuses_images(tiny_model_dir: Path) -> None:
    engine = main.TransformersEngine(make_settings(model_repo_id=str(tiny_model_dir), device_map="cpu"))
    with pytest.raises(main.BadRequest) as caught:
        prepare(engine, ask(image_part(data_url(png_bytes()))))
    assert caught.value.message == f"model {tiny_model_dir.name} does not accept images or videos"
    assert caught.value.param == "messages[0].content[0]"


# ---- live server + openai client -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl_server(tiny_vl_dir: Path) -> Iterator[tuple[LiveServer, list[main.PreparedPrompt]]]:
    settings = make_settings(model_repo_id=str(tiny_vl_dir), device_map="cpu", temperature=0, max_tokens=8,
                             media_allow_private_hosts=1, max_video_frames=4, max_images_per_request=3)  # fmt: skip
    engine = main.TransformersEngine(settings)
    seen: list[main.PreparedPrompt] = []
    original = engine.prepare

    def recording_prepare(
        messages: list[dict[str, Any]], params: main.GenerationParams, template: main.TemplateInputs | None = None
    ) -> main.PreparedPrompt:
        seen.append(original(messages, params, template))  # the prompt exactly as the processor built it
        return seen[-1]

    engine.prepare = recording_prepare  # type: ignore[method-assign]
    with LiveServer(main.create_app(settings, engine)) as server:
        yield server, seen


def client_for(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize(
    ("parts", "image_tokens"),
    [
        ("one image", TOKENS_PER_IMAGE),
        ("two images", 2 * TOKENS_PER_IMAGE),
        ("http image", TOKENS_PER_IMAGE),
        ("video", 4 * TOKENS_PER_IMAGE),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_with_media(
    vl_server: tuple[LiveServer, list[main.PreparedPrompt]], media_url: str, parts: str, image_tokens: int,
    stream: bool,
) -> None:  # fmt: skip
    server, seen = vl_server
    content = {
        "one image": [image_part(data_url(png_bytes()))],
        "two images": [image_part(data_url(png_bytes())), image_part(data_url(png_bytes((64, 48), (0, 0, 255))))],
        "http image": [image_part(media_url + "/img.png")],
        "video": [video_part(data_url(video_bytes(10), "video/mp4"))],
    }[parts]
    client = client_for(server)
    seen.clear()
    kwargs: dict[str, Any] = {"model": "m", "messages": ask(*content), "temperature": 0}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    else:
        completion = client.chat.completions.create(**kwargs)
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert completion.usage is not None and completion.usage.prompt_tokens == seen[0].prompt_tokens
    engine = server.state.engine
    assert isinstance(engine, main.TransformersEngine)
    if parts == "video" and isinstance(engine.handle.get().vision, main.StockVision):
        return  # native video path: counted in test_video_with_torchvision_uses_the_native_video_path
    assert placeholder_counts(engine, seen[0]) == (image_tokens, 0)


@pytest.mark.parametrize(
    ("content", "param", "message"),
    [
        ([image_part("data:image/png;base64,@@@")], "messages[0].content[0]", "invalid base64 in data URL"),
        ([{"type": "text", "text": "hi"}, image_part(data_url(b"nope"))], "messages[0].content[1]",
         "the bytes are not an image Pillow can read"),
        ([image_part(data_url(png_bytes()))] * 4, "messages[0].content[3]",
         "too many images: 4 (at most 3 per request)"),
        ([video_part(data_url(b"garbage", "video/mp4"))], "messages[0].content[0]",
         "the bytes are not a video PyAV can decode"),
        ([image_part("gopher://x/y")], "messages[0].content[0]",
         "unsupported URL scheme 'gopher': use data:, http(s): or a file under MEDIA_ROOT"),
    ],
)  # fmt: skip
def test_bad_media_through_the_client_is_bad_request_error(
    vl_server: tuple[LiveServer, list[main.PreparedPrompt]], content: list[dict[str, Any]], param: str, message: str
) -> None:
    server, _ = vl_server
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).chat.completions.create(model="m", messages=[{"role": "user", "content": content}])
    assert caught.value.body == {"message": message, "type": "invalid_request_error", "param": param,
                                 "code": "invalid_request"}  # fmt: skip
    assert httpx.get(server.url + "/health/ready", timeout=5).status_code == 200  # still serving


def test_text_only_server_refuses_an_image_and_keeps_serving(tiny_server: LiveServer) -> None:
    client = client_for(tiny_server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=ask(image_part(data_url(png_bytes()))))
    assert caught.value.body["message"].endswith("does not accept images or videos")  # type: ignore[index]
    assert caught.value.body["param"] == "messages[0].content[0]"  # type: ignore[index]
    after = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert after.choices[0].finish_reason == "length"
