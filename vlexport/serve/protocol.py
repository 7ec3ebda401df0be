"""OpenAI chat-completions requests -> a validated generation request; errors in OpenAI's shape.

Everything a client can get wrong is checked here, before a request reaches the queue, and each failure names the
field (`param`) the way OpenAI's API does: `messages[0].content[1].image_url.url`, `max_tokens`, `temperature`.
Nothing here touches ONNX Runtime: images are decoded and preprocessed, prompts rendered and tokenized, on the
request's own thread, so the worker that owns the sessions only runs graphs.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Image formats Pillow may open. Others (EPS calls Ghostscript, and several rarely used decoders have had
# vulnerabilities) are refused before any decoder runs.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

# Fields OpenAI defines that this server cannot honour: refused when set to anything but their neutral value, so
# that a client never gets an answer computed differently from what it asked for.
_UNSUPPORTED = {
    "n": 1,
    "logprobs": False,
    "top_logprobs": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "audio": None,
    "modalities": None,
    "prediction": None,
}


class RequestError(Exception):
    """A client error: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class Limits:
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 50_000_000
    allow_local_images: bool = False
    default_max_tokens: int = 256


@dataclass
class ChatRequest:
    """What the scheduler needs: the task, the prompt's token ids, the image's pixels, the sampling options."""

    model: str  # as the client named it
    task: str | None  # the bundle's task (None: the base)
    prompt_ids: list[int]
    pixels: np.ndarray
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _bad(message: str, param: str | None, code: str | None = "invalid_value", status: int = 400) -> RequestError:
    return RequestError(status, message, param=param, code=code)


class RequestParser:
    """Validates a decoded JSON body against one loaded bundle. Thread-safe (it only reads the bundle)."""

    def __init__(self, bundle, base_name: str, limits: Limits):
        self.bundle, self.base_name, self.limits = bundle, base_name, limits
        self.context = int(bundle.manifest["target"]["shapes"]["context"])
        self.max_positions = bundle.manifest["model"].get("max_position_embeddings")
        tok = bundle.manifest["tokenizer"]
        self.bos, self.eos = tok.get("bos_token"), tok.get("eos_token")

    # -- models ---------------------------------------------------------------------------------------------
    def models(self) -> dict[str, str | None]:
        """Model name -> bundle task. The bundle's own name means what `vlexport run` without --task runs."""
        names = {self.base_name: self.bundle.resolve_task(None)}
        names.update({t: t for t in self.bundle.tasks})
        return names

    def resolve_model(self, model) -> str | None:
        if model is None:
            raise _bad("you must give `model`: a task name or the bundle's name for the base model", "model",
                       "missing_required_parameter")
        if not isinstance(model, str):
            raise _bad(f"`model` must be a string (got {type(model).__name__})", "model", "invalid_type")
        models = self.models()
        if model not in models:
            known = ", ".join(models)
            raise RequestError(404, f"the model '{model}' does not exist on this server; it serves: {known}",
                               param="model", code="model_not_found")
        return models[model]

    # -- the request ----------------------------------------------------------------------------------------
    def parse(self, body) -> ChatRequest:
        if not isinstance(body, dict):
            raise _bad(f"the request body must be a JSON object (got a JSON {type(body).__name__})", None, "invalid_type")
        task = self.resolve_model(body.get("model"))
        for name, neutral in _UNSUPPORTED.items():
            value = body.get(name)
            if value is not None and value != neutral and not (neutral is None and value in ([], {})):
                raise _bad(f"`{name}` is not supported by vlexport serve (got {value!r})", name, "unsupported_parameter")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise _bad("`response_format` other than {\"type\": \"text\"} is not supported", "response_format",
                       "unsupported_parameter")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise _bad(f"`stream` must be true or false (got {stream!r})", "stream", "invalid_type")
        include_usage = False
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise _bad("`stream_options` must be an object", "stream_options", "invalid_type")
            include_usage = options.get("include_usage", False)
            if not isinstance(include_usage, bool):
                raise _bad("`stream_options.include_usage` must be true or false", "stream_options.include_usage",
                           "invalid_type")
        temperature = self._number(body, "temperature", 1.0, 0.0, 2.0, "between 0 and 2")
        top_p = self._number(body, "top_p", 1.0, 0.0, 1.0, "greater than 0 and at most 1", open_low=True)
        seed = body.get("seed")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        elif not _is_int(seed):
            raise _bad(f"`seed` must be an integer (got {seed!r})", "seed", "invalid_type")
        elif seed < 0:
            raise _bad(f"`seed` must be at least 0 (got {seed})", "seed")
        stop = self._stop(body.get("stop"))
        max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(max_param)
        if max_tokens is not None:
            if not _is_int(max_tokens):
                raise _bad(f"`{max_param}` must be an integer (got {max_tokens!r})", max_param, "invalid_type")
            if max_tokens < 1:
                raise _bad(f"`{max_param}` must be at least 1 (got {max_tokens})", max_param)
        messages, image = self._messages(body.get("messages"))
        text = self.render(messages)
        ids = self.bundle.encode(text)
        prefix = self.prefix_tokens(task)
        used = prefix + len(ids)
        if used > self.context:
            raise _bad(f"the prompt is {len(ids)} tokens (image included){_prefix_note(prefix)}, more than this "
                       f"bundle's context of {self.context} tokens; shorten `messages`", "messages",
                       "context_length_exceeded")
        room = self.context - used
        if max_tokens is None:
            max_tokens = min(self.limits.default_max_tokens, room)
            if max_tokens < 1:
                raise _bad(f"the prompt is {len(ids)} tokens{_prefix_note(prefix)}: it fills this bundle's context of "
                           f"{self.context} tokens and leaves no room for an answer; shorten `messages`", "messages",
                           "context_length_exceeded")
        elif max_tokens > room:
            raise _bad(f"the prompt is {len(ids)} tokens{_prefix_note(prefix)} and `{max_param}` is {max_tokens}: "
                       f"together more than this bundle's context of {self.context} tokens; ask for at most {room}",
                       max_param, "context_length_exceeded")
        last = self.position_offset(task) + len(ids) + max_tokens
        if self.max_positions and last > int(self.max_positions):
            raise _bad(f"the prompt is {len(ids)} tokens and `{max_param}` is {max_tokens}: positions would reach {last}, "
                       f"past the model's max_position_embeddings of {self.max_positions}; ask for fewer tokens",
                       max_param, "context_length_exceeded")
        pixels = self.bundle.pixel_values(image)
        return ChatRequest(model=body["model"], task=task, prompt_ids=ids, pixels=pixels, max_tokens=max_tokens,
                           temperature=float(temperature), top_p=float(top_p), seed=seed, stop=stop, stream=stream,
                           include_usage=include_usage)

    def prefix_tokens(self, task: str | None) -> int:
        """A prefix task's pack takes context like tokens do (its KV entries, and PEFT's positions)."""
        info = self.bundle.tasks.get(task) if task is not None else None
        return int((info or {}).get("prefix_tokens") or 0)

    def position_offset(self, task: str | None) -> int:
        info = self.bundle.tasks.get(task) if task is not None else None
        return int((info or {}).get("position_offset") or 0)

    def render(self, messages: list[dict]) -> str:
        """The bundle's chat template over the whole conversation, with the generation prompt."""
        import jinja2

        from ..runtime import render_chat_template

        try:
            return render_chat_template(self.bundle.chat_template, messages, add_generation_prompt=True,
                                        bos_token=self.bos, eos_token=self.eos)
        except jinja2.TemplateError as e:  # templates refuse some conversations (roles that do not alternate...)
            raise _bad(f"the model's chat template refused these `messages`: {e}", "messages") from None

    @staticmethod
    def _number(body, name, default, low, high, allowed, open_low=False) -> float:
        value = body.get(name)
        if value is None:
            return default
        if not _is_number(value):
            raise _bad(f"`{name}` must be a number {allowed} (got {value!r})", name, "invalid_type")
        if value > high or value < low or (open_low and value <= low):
            raise _bad(f"`{name}` must be {allowed} (got {value})", name)
        return value

    @staticmethod
    def _stop(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad(f"`stop` must be a string or a list of strings (got {stop!r})", "stop", "invalid_type")
        if len(stop) > 4:
            raise _bad(f"`stop` takes at most 4 sequences (got {len(stop)})", "stop")
        if any(s == "" for s in stop):
            raise _bad("`stop` sequences must not be empty", "stop")
        return stop

    def _messages(self, messages):
        """OpenAI messages -> the chat template's messages (content parts {"type": "image"|"text"}) and the image."""
        if messages is None:
            raise _bad("you must give `messages`: a list of chat messages with one image", "messages",
                       "missing_required_parameter")
        if not isinstance(messages, list):
            raise _bad(f"`messages` must be a list of message objects (got {type(messages).__name__})", "messages",
                       "invalid_type")
        if not messages:
            raise _bad("`messages` must not be empty", "messages")
        out, images = [], []
        token = self.bundle.image_token
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise _bad(f"`{where}` must be an object with `role` and `content`", where, "invalid_type")
            role = message.get("role")
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant"):
                raise _bad(f"`{where}.role` must be one of system, developer, user, assistant (got {role!r})",
                           f"{where}.role")
            content = message.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise _bad(f"`{where}.content` must be a string or a list of content parts", f"{where}.content",
                           "invalid_type")
            parts = []
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                if not isinstance(part, dict):
                    raise _bad(f"`{pwhere}` must be an object with a `type`", pwhere, "invalid_type")
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise _bad(f"`{pwhere}.text` must be a string", f"{pwhere}.text", "invalid_type")
                    if token in text:
                        raise _bad(f"`{pwhere}.text` contains the image placeholder '{token}'; send the image as an "
                                   "image_url part instead", f"{pwhere}.text")
                    parts.append({"type": "text", "text": text})
                elif kind == "image_url":
                    if role != "user":
                        raise _bad(f"`{pwhere}`: images go in user messages (this one is {role})", pwhere)
                    url = part.get("image_url")
                    if isinstance(url, dict):
                        url = url.get("url")
                    if not isinstance(url, str):
                        raise _bad(f"`{pwhere}.image_url.url` must be a string (a data: URL)", f"{pwhere}.image_url.url",
                                   "invalid_type")
                    images.append((f"{pwhere}.image_url.url", url))
                    parts.append({"type": "image"})
                else:
                    raise _bad(f"`{pwhere}.type` {kind!r} is not supported; use 'text' or 'image_url'",
                               f"{pwhere}.type", "unsupported_parameter")
            out.append({"role": role, "content": parts})
        if not images:
            raise _bad("`messages` have no image: this model answers about one image; add an image_url part to a user "
                       "message", "messages", "missing_image")
        if len(images) > 1:
            raise _bad(f"the request has {len(images)} images ({', '.join(w for w, _ in images)}); this model takes "
                       "exactly one image per request", images[1][0], "too_many_images")
        where, url = images[0]
        return out, load_image(url, where, self.limits)


def _prefix_note(prefix: int) -> str:
    return f" after the task's {prefix}-token prefix" if prefix else ""


# -- images ---------------------------------------------------------------------------------------------------
def load_image(url: str, where: str, limits: Limits):
    """A data: URL (or, with allow_local_images, a local path or file:// URL) -> a decoded PIL image, within limits."""
    if url.startswith("data:"):
        data = _data_url_bytes(url, where, limits)
    elif url.startswith(("http://", "https://")):
        raise _bad(f"`{where}`: this server does not fetch remote images; send the image inline as a "
                   "data:image/...;base64 URL", where, "unsupported_image_url")
    else:
        data = _local_bytes(url, where, limits)
    return decode_image(data, where, limits)


def _data_url_bytes(url: str, where: str, limits: Limits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise _bad(f"`{where}` must be a base64 data URL: data:image/png;base64,...", where, "invalid_image_url")
    # Size before decoding: base64 is 4 characters per 3 bytes.
    approx = len(payload) * 3 // 4
    if approx > limits.max_image_bytes:
        raise _bad(f"`{where}`: the image is about {approx} bytes, more than this server's limit of "
                   f"{limits.max_image_bytes} bytes", where, "image_too_large", status=413)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"`{where}`: the data URL is not valid base64 ({e})", where, "invalid_image_url") from None


def _local_bytes(url: str, where: str, limits: Limits) -> bytes:
    if not limits.allow_local_images:
        raise _bad(f"`{where}`: local image paths are off on this server (start it with --allow-local-images); "
                   "send the image as a data:image/...;base64 URL", where, "local_images_disabled")
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if not path.is_absolute():
        raise _bad(f"`{where}`: a local image path must be absolute (got '{path}')", where, "invalid_image_url")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise FileNotFoundError
    except OSError:
        raise _bad(f"`{where}`: no such image file '{path}'", where, "invalid_image_url") from None
    if size > limits.max_image_bytes:
        raise _bad(f"`{where}`: the image is {size} bytes, more than this server's limit of {limits.max_image_bytes}",
                   where, "image_too_large", status=413)
    return path.read_bytes()


def decode_image(data: bytes, where: str, limits: Limits):
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise _bad(f"`{where}`: the image is {len(data)} bytes, more than this server's limit of "
                   f"{limits.max_image_bytes} bytes", where, "image_too_large", status=413)
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise _bad(f"`{where}` is not an image this server reads ({', '.join(IMAGE_FORMATS)})", where,
                   "invalid_image") from None
    except Image.DecompressionBombError as e:
        raise _bad(f"`{where}`: {e}", where, "image_too_large") from None
    except Exception as e:  # Pillow's header parsers raise a variety of errors on corrupt input
        raise _bad(f"`{where}` is not a readable image ({type(e).__name__}: {e})", where, "invalid_image") from None
    # The header gives the size before any pixel is decoded: a decompression bomb is refused here, below Pillow's
    # own limit (which only warns up to twice MAX_IMAGE_PIXELS).
    w, h = img.size
    if w * h > limits.max_image_pixels or w < 1 or h < 1:
        raise _bad(f"`{where}`: the image is {w}x{h} = {w * h} pixels; this server takes at most "
                   f"{limits.max_image_pixels} pixels (decompression bomb guard)", where, "image_too_large")
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise _bad(f"`{where}`: {e}", where, "image_too_large") from None
    except Exception as e:
        raise _bad(f"`{where}` is not a readable image ({type(e).__name__}: {e})", where, "invalid_image") from None
    return img
