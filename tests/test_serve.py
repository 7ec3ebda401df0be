"""`vlexport serve` as a real server: a subprocess on 127.0.0.1, driven with the `openai` package.

The bank: tiny-gqa base + vqa (PEFT prefix, 4 tokens), caption (AdapterHub bottlenecks in both towers) and chat
(AdapterHub prefix, 5 tokens): four models with the base. Every answer is compared with Bundle.generate's tokens
for the same request alone, so batching, padding or task mix-ups cannot pass unnoticed.
"""

import base64
import importlib.util
import io
import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import openai
import pytest

# The load generator is the benchmark's own (bench/serve_load.py), so the test and the committed figures run the
# same requests. Registered in sys.modules before it runs: its dataclasses look their module up there.
_spec = importlib.util.spec_from_file_location("serve_load", Path(__file__).parents[1] / "bench" / "serve_load.py")
load = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = load
_spec.loader.exec_module(load)

THREADS = "1"  # server and reference alike: same kernels, and room for the other tests on a small machine
MAX_IMAGE_BYTES = 2_000_000


@pytest.fixture(scope="module")
def bank(tiny_gqa_base, tmp_path_factory):
    return load.build_bank(tmp_path_factory.mktemp("serve"), base=tiny_gqa_base)


@pytest.fixture(scope="module")
def reference(bank):
    import vlexport

    return vlexport.load(bank, threads=int(THREADS))


def _start(bank, tmp_path_factory, name, *options):
    log = tmp_path_factory.mktemp("serve_logs") / f"{name}.log"
    try:
        proc, url = load.start_server(bank, "--threads", THREADS, *options, log=log)
    except RuntimeError as e:
        pytest.fail(f"{e}\n{log.read_text()}")
    return proc, url, log


@pytest.fixture(scope="module")
def server(bank, tmp_path_factory):
    """max_batch 4, default queue; image bytes capped at 2 MB to test the limit cheaply."""
    proc, url, log = _start(bank, tmp_path_factory, "main", "--max-batch", "4",
                            "--max-image-bytes", str(MAX_IMAGE_BYTES))
    yield url
    code = load.stop_server(proc)
    # uvicorn re-raises the signal after a graceful shutdown, so the exit status says "ended by SIGTERM"
    assert code == -signal.SIGTERM and log.read_text().rstrip().endswith("vlexport serve: stopped"), log.read_text()


@pytest.fixture(scope="module")
def tight(bank, tmp_path_factory):
    """One decode row, one queue place; local images allowed."""
    proc, url, log = _start(bank, tmp_path_factory, "tight", "--max-batch", "1", "--max-queue", "1",
                            "--allow-local-images")
    yield url, proc
    if proc.poll() is None:
        load.stop_server(proc)


def client(url, **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, **kw)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, kind="png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def user(url: str, text: str = "What is shown here?") -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


def post(url: str, body, path="/v1/chat/completions", raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def get(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return r.status, r.read().decode()


def metric(url: str, name: str) -> float:
    _, text = get(url, "/metrics")
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def photo_url(photos):
    return data_url(png(photos["chelsea"].resize((96, 64))))


def test_models_health_and_metrics(server, bank):
    status, body = get(server, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    models = client(server).models.list()
    assert [m.id for m in models.data] == [bank.name, "vqa", "caption", "chat"]
    assert {m.id: m.model_extra["vlexport"]["task"] for m in models.data}[bank.name] is None
    assert client(server).models.retrieve("vqa").model_extra["vlexport"]["prefix_tokens"] == 4
    _, text = get(server, "/metrics")
    for name in ("vlexport_requests_total counter", "vlexport_queue_depth gauge", "vlexport_active_rows gauge",
                 "vlexport_request_latency_seconds histogram", "vlexport_time_to_first_token_seconds histogram",
                 "vlexport_decode_step_rows histogram", "vlexport_completion_tokens_total counter"):
        assert f"# TYPE {name}" in text, name


def test_chat_equals_bundle_generate(server, bank, reference, photos, photo_url):
    """Greedy tokens and text equal Bundle.generate(task=...)'s, streaming and not, for the base and three tasks."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(photo_url.split(",", 1)[1])))
    c = client(server)
    answers = {}
    for model, task in [(bank.name, None), ("vqa", "vqa"), ("caption", "caption"), ("chat", "chat")]:
        expected = reference.generate(image, prompt="What is shown here?", max_new_tokens=12, task=task)
        r = c.chat.completions.create(model=model, messages=user(photo_url), max_tokens=12, temperature=0)
        assert r.model_extra["vlexport"]["token_ids"] == expected.token_ids, model
        assert r.choices[0].message.content == expected.text and r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(expected.prompt_ids) and r.usage.completion_tokens == 12
        assert r.model == model and r.object == "chat.completion"
        chunks = list(c.chat.completions.create(model=model, messages=user(photo_url), max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected.text
        ids = [t for ch in chunks for t in ((ch.model_extra or {}).get("vlexport") or {}).get("token_ids", [])]
        assert ids == expected.token_ids
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
        assert len({ch.id for ch in chunks}) == 1
        answers[model] = tuple(expected.token_ids)
    assert len(set(answers.values())) == 4, "two models answered alike: a task is not applied"


def test_sampling_seed_and_stop(server, reference, photo_url):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(photo_url.split(",", 1)[1])))
    c = client(server)
    expected = reference.generate(image, prompt="Describe it.", max_new_tokens=16, temperature=0.9, top_p=0.8,
                                  seed=7, task="vqa")
    r = c.chat.completions.create(model="vqa", messages=user(photo_url, "Describe it."), max_tokens=16,
                                  temperature=0.9, top_p=0.8, seed=7)
    assert r.model_extra["vlexport"]["token_ids"] == expected.token_ids
    greedy = reference.generate(image, prompt="Describe it.", max_new_tokens=24, task="caption").text
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 3]
    cut = greedy[:greedy.index(stop)]
    for stream in (False, True):
        kw = dict(model="caption", messages=user(photo_url, "Describe it."), max_tokens=24, temperature=0,
                  stop=[stop, "never-said"])
        if stream:
            chunks = list(c.chat.completions.create(stream=True, **kw))
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = c.chat.completions.create(**kw)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert (text, finish) == (cut, "stop")


def test_conversation_with_system_and_history(server, reference, photo_url):
    """Several messages go through the bundle's chat template as a whole (LLaVA's: roles in capitals, the image
    first in its message, system text bare), then equal Bundle.generate on that prompt."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(photo_url.split(",", 1)[1])))
    messages = [{"role": "system", "content": "Be brief."}, *user(photo_url, "What is it?"),
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": [{"type": "text", "text": "Colour?"}]}]
    raw = "Be brief. USER: <image>\nWhat is it? ASSISTANT: A cat. USER: Colour? ASSISTANT:"
    expected = reference.generate(image, raw_prompt=raw, max_new_tokens=8, task="chat")
    r = client(server).chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0)
    assert r.model_extra["vlexport"]["token_ids"] == expected.token_ids
    assert r.usage.prompt_tokens == len(expected.prompt_ids)


def _bomb(width: int, height: int) -> bytes:
    """A real PNG whose header claims width x height: what a decompression bomb shows before decoding."""
    from PIL import Image

    data = bytearray(png(Image.new("L", (1, 1))))
    ihdr = 8 + 8  # signature, then IHDR's length and type
    data[ihdr:ihdr + 8] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 13:ihdr + 17] = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])).to_bytes(4, "big")
    return bytes(data)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, bank, photo_url, tmp_path):
    good_body = {"model": "vqa", "messages": user(photo_url), "max_tokens": 2}
    noise = np.random.default_rng(0).integers(0, 256, (880, 880, 3), dtype=np.uint8)
    from PIL import Image

    too_big = png(Image.fromarray(noise))
    assert MAX_IMAGE_BYTES < len(too_big) and len(data_url(too_big)) < MAX_IMAGE_BYTES * 4 // 3 + 900_000
    image_part = {"type": "image_url", "image_url": {"url": photo_url}}
    (tmp_path / "p.png").write_bytes(base64.b64decode(photo_url.split(",", 1)[1]))

    def with_(**kw):
        return {**good_body, **kw}

    # (raw body or JSON body, status, param, a word the message must contain)
    cases = [
        (b'{"model": "vqa", "messages": [', 400, None, "JSON"),
        (b"[1, 2]", 400, None, "object"),
        ({"model": "vqa", "max_tokens": 2}, 400, "messages", "messages"),
        (with_(messages="hello"), 400, "messages", "list"),
        (with_(messages=[]), 400, "messages", "empty"),
        ({"messages": user(photo_url)}, 400, "model", "model"),
        (with_(model="ocr"), 404, "model", "ocr"),
        (with_(model=7), 400, "model", "string"),
        (with_(messages=[{"role": "user", "content": "no picture"}]), 400, "messages", "no image"),
        (with_(messages=[{"role": "user", "content": [image_part, image_part, {"type": "text", "text": "?"}]}]),
         400, "messages[0].content[1].image_url.url", "2 images"),
        (with_(messages=user(data_url(b"hello, not an image"))), 400, "messages[0].content[0].image_url.url", "not an image"),
        (with_(messages=user("data:image/png;base64,@@@not base64@@@")), 400, "messages[0].content[0].image_url.url", "base64"),
        (with_(messages=user(data_url(_bomb(10_000, 6_000)))), 400, "messages[0].content[0].image_url.url", "pixels"),
        (with_(messages=user(data_url(_bomb(40_000, 40_000)))), 400, "messages[0].content[0].image_url.url", "decompression bomb"),
        (with_(messages=user(data_url(too_big))), 413, "messages[0].content[0].image_url.url", "bytes"),
        (None, 413, None, "body"),  # a body over the limit, refused on its Content-Length
        (with_(messages=user("https://example.com/cat.png")), 400, "messages[0].content[0].image_url.url", "remote"),
        (with_(messages=user(str(tmp_path / "p.png"))), 400, "messages[0].content[0].image_url.url", "--allow-local-images"),
        (with_(messages=user(photo_url, "cat " * 5000)), 400, "messages", "context"),
        (with_(max_tokens=4090), 400, "max_tokens", "context"),
        (with_(max_tokens=0), 400, "max_tokens", "at least 1"),
        (with_(max_tokens="ten"), 400, "max_tokens", "integer"),
        (with_(temperature=-0.5), 400, "temperature", "between 0 and 2"),
        (with_(temperature="hot"), 400, "temperature", "number"),
        (with_(top_p=0), 400, "top_p", "greater than 0"),
        (with_(top_p=1.5), 400, "top_p", "at most 1"),
        (with_(stop=123), 400, "stop", "string"),
        (with_(stream="yes"), 400, "stream", "true or false"),
        (with_(n=3), 400, "n", "not supported"),
        (with_(messages=[{"role": "robot", "content": [image_part]}]), 400, "messages[0].role", "role"),
        (with_(messages=[{"role": "user", "content": [image_part, {"type": "input_audio"}]}]), 400,
         "messages[0].content[1].type", "input_audio"),
        (with_(messages=user(photo_url, "look: <image>")), 400, "messages[0].content[1].text", "<image>"),
    ]
    c = client(server)
    for body, status, param, word in cases:
        if body is None:
            raw = json.dumps(with_(messages=user(data_url(b"\0" * (MAX_IMAGE_BYTES * 2))))).encode()
        else:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, headers, answer = post(server, None, raw=raw)
        assert got == status, (param, word, answer)
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, answer
        assert word in error["message"], (word, error["message"])
        assert param is None or param in error["message"], error["message"]  # the message names the field
        # a well-formed request right after still succeeds
        ok = c.chat.completions.create(model="vqa", messages=user(photo_url), max_tokens=2, temperature=0)
        assert ok.usage.completion_tokens == 2
    assert len(cases) >= 15
    status, _, answer = post(server, None, path="/v1/nothing", raw=b"{}")
    assert status == 404 and answer["error"]["code"] == "unknown_url"
    assert metric(server, 'vlexport_requests_total{model="vqa",status="400"}') >= 20


def test_32_concurrent_requests_over_four_models(server, bank):
    """Every request completes once, with the tokens Bundle.generate gives it alone; decode steps were shared."""
    models = {m.id: m.model_extra["vlexport"]["task"] for m in client(server).models.list().data}
    requests = load.make_requests(32, models, seed=5, max_tokens=(6, 20))
    steps_before = metric(server, "vlexport_decode_step_rows_count")
    rows_before = metric(server, "vlexport_decode_step_rows_sum")
    t0 = time.monotonic()
    results, wall = load.run_concurrent(server, requests, timeout_s=120)
    assert time.monotonic() - t0 < 120
    assert [r.error for r in results if r.error] == []
    assert sorted(r.index for r in results) == list(range(32))
    assert len({r.id for r in results}) == 32  # none lost, none duplicated
    expected = load.expected_tokens(bank, requests, threads=int(THREADS))
    assert {r.index: r.token_ids for r in results} == expected
    steps = metric(server, "vlexport_decode_step_rows_count") - steps_before
    rows = metric(server, "vlexport_decode_step_rows_sum") - rows_before
    assert rows > steps, "no decode step had more than one row: requests were not batched"
    assert metric(server, "vlexport_queue_depth") == 0 and metric(server, "vlexport_active_rows") == 0


def _holder(url, image_url, model="vqa", max_tokens=4000):
    """A long streaming request, started and holding its decode row until closed."""
    s = client(url).chat.completions.create(model=model, messages=user(image_url), max_tokens=max_tokens,
                                            temperature=0, stream=True)
    it = iter(s)
    next(it), next(it)  # the role chunk, then a token: it is decoding
    return s, it


def _queue_behind(url, photo_url):
    """A second request, sent on a thread, that waits in the queue behind the holder; (thread, {"r": answer})."""
    queued = {}
    t = threading.Thread(target=lambda: queued.update(r=post(url, {"model": "chat", "messages": user(photo_url),
                                                                    "max_tokens": 3})))
    t.start()
    deadline = time.monotonic() + 10
    while json.loads(get(url, "/health")[1])["queue_depth"] < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)
    return t, queued


def test_queue_full_gets_429_and_a_cancelled_stream_frees_its_slot(tight, photo_url):
    url, _ = tight
    stream, _ = _holder(url, photo_url)  # holds the only row
    t, queued = _queue_behind(url, photo_url)
    status, headers, answer = post(url, {"model": "chat", "messages": user(photo_url), "max_tokens": 3})
    assert status == 429 and int(headers["Retry-After"]) >= 1 and answer["error"]["code"] == "queue_full"
    cancelled = metric(url, 'vlexport_requests_dropped_total{reason="cancelled"}')
    stream.close()  # the client goes away: its row must be freed, not decoded to 4000 tokens
    t.join(10)
    assert queued["r"][0] == 200 and queued["r"][2]["usage"]["completion_tokens"] == 3
    assert metric(url, 'vlexport_requests_dropped_total{reason="cancelled"}') == cancelled + 1
    # A client that gives up on a non-streamed answer (it closes the connection) frees its row too.
    body = json.dumps({"model": "vqa", "messages": user(photo_url), "max_tokens": 4000}).encode()
    with pytest.raises(OSError):
        urllib.request.urlopen(urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                                      headers={"Content-Type": "application/json"}), timeout=0.5)
    deadline = time.monotonic() + 10
    while metric(url, 'vlexport_requests_dropped_total{reason="cancelled"}') < cancelled + 2:
        assert time.monotonic() < deadline, "the closed connection's request kept decoding"
        time.sleep(0.05)
    assert json.loads(get(url, "/health")[1])["active_rows"] == 0
    assert metric(url, 'vlexport_requests_dropped_total{reason="timeout"}') == 0


@pytest.fixture
def in_process(bank):
    """create_app + uvicorn on a thread of this process (no signal handlers there); yields a function that starts
    one with the given options and returns its URL."""
    import uvicorn

    from vlexport.serve import create_app

    servers = []

    def start(**options):
        port = load.free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(bank, threads=1, log=lambda m: None, **options),
                                               host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


def test_request_timeout(in_process, photo_url):
    url = in_process(request_timeout_s=1.0)
    c = client(url)
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:  # 504: 4000 tokens take several seconds here
        c.chat.completions.create(model="vqa", messages=user(photo_url), max_tokens=4000, temperature=0)
    assert e.value.status_code == 504 and e.value.body["code"] == "timeout" and time.monotonic() - t0 < 15
    with pytest.raises(openai.APIError, match="timeout"):  # streamed: an error event in OpenAI's shape
        list(c.chat.completions.create(model="vqa", messages=user(photo_url), max_tokens=4000, temperature=0,
                                       stream=True))
    assert c.chat.completions.create(model="vqa", messages=user(photo_url), max_tokens=1).usage.completion_tokens == 1
    assert metric(url, 'vlexport_requests_dropped_total{reason="timeout"}') == 2


def test_local_images_when_allowed(tight, photo_url, tmp_path):
    url, _ = tight
    c = client(url)
    path = tmp_path / "p.png"
    path.write_bytes(base64.b64decode(photo_url.split(",", 1)[1]))
    a = c.chat.completions.create(model="chat", messages=user(str(path)), max_tokens=5, temperature=0)
    b = c.chat.completions.create(model="chat", messages=user(f"file://{path}"), max_tokens=5, temperature=0)
    d = c.chat.completions.create(model="chat", messages=user(photo_url), max_tokens=5, temperature=0)
    assert a.model_extra["vlexport"]["token_ids"] == b.model_extra["vlexport"]["token_ids"] == \
        d.model_extra["vlexport"]["token_ids"]
    with pytest.raises(openai.BadRequestError, match="no such image file"):
        c.chat.completions.create(model="chat", messages=user(str(tmp_path / "missing.png")), max_tokens=5)


def test_sigterm_drains_then_stops(tight, photo_url):
    """On SIGTERM the server stops accepting connections, finishes the stream in flight and the request queued
    behind it, then exits."""
    url, proc = tight
    stream, it = _holder(url, photo_url, model="caption", max_tokens=3000)  # seconds of decoding
    t, queued = _queue_behind(url, photo_url)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:  # the listening socket closes first
        try:
            get(url, "/health")
        except OSError:
            break
        assert time.monotonic() < deadline, "the server still accepts connections after SIGTERM"
        time.sleep(0.05)
    rest = list(it)
    ids = [t for ch in rest for t in ((ch.model_extra or {}).get("vlexport") or {}).get("token_ids", [])]
    assert len(ids) == 3000 - 1 and rest[-1].choices[0].finish_reason == "length"  # the stream in flight finished
    t.join(30)
    assert queued["r"][0] == 200 and queued["r"][2]["usage"]["completion_tokens"] == 3  # so did the queued one
    assert proc.wait(30) == -signal.SIGTERM
