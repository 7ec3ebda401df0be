"""Run a bundle: image + prompt -> tokens, on ONNX Runtime. Imports neither torch nor transformers."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends.onnxruntime import OrtRunner
from .bundle import bundle_file, read_manifest
from .errors import VlexportError
from .preprocess import ImageSpec, expand_image_tokens, open_image, preprocess_image
from . import lora_slots


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # new tokens only
    prompt_ids: list[int]
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "timings": self.timings}


def render_chat_template(template: str, messages: list, **kwargs) -> str:
    """Render a HF chat template the way transformers does (sandboxed jinja, trim/lstrip blocks, {% generation %})."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # HF marks assistant text with {% generation %}; rendering only needs the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, **kwargs)


def render_chat_prompt(template: str, prompt: str, bos_token: str | None, eos_token: str | None) -> str:
    """One user turn, an image then the question, with the generation prompt: LLaVA's chat format."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return render_chat_template(template, messages, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)


@dataclass
class Request:
    """One question about one image, for Bundle.generate_batch (and `vlexport run --batch`)."""
    image: object  # path or PIL image
    prompt: str | None = None
    raw_prompt: str | None = None
    task: str | None = None
    max_new_tokens: int = 32


class KvState:
    """The decoder's cache for the rows of one batch, and what each row needs for its next step.

    Every row runs the same decoder graph (one decoder group, Bundle.decoder_group): `task` is the task whose graph
    the steps use; `tasks` keeps each row's own task, whose adapter slot weights (LoRA, bottleneck) the row is fed:
    one row of slot inputs when every row has the same task, else one per row (the "per-row adapter index",
    resolved into stacked rows once per change of the batch's rows, not per step). Portable form: past
    [rows, kv, T, hd] left-padded, `mask` 0 on the padding. ORT-native form: a SharedKvBuffer (backends/ort_kv.py)
    of fixed rows and capacity, written in place; `slots` maps each row to its buffer row."""

    def __init__(self, group: str, form: str, task: str | None):
        self.group, self.form, self.task = group, form, task
        self.tasks: list[str | None] = []
        self._feed: tuple | None = None  # (key, feed): the decoder slot feed for the rows as they are
        self.positions = np.zeros(0, np.int64)  # position of the next token fed, per row
        self.logits: np.ndarray | None = None  # [rows, vocab]: the latest logits of each row
        self.past: dict[str, np.ndarray] = {}
        self.mask = np.zeros((0, 0), np.int64)
        self.buffer = None
        self.slots: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.tasks)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens held per row, prefix included."""
        if self.form == "ort-native":
            return self.buffer.lengths[self.slots].copy()
        return self.mask.sum(axis=1)

    # -- portable ---------------------------------------------------------------------------------------------
    def add_portable_row(self, past: dict, mask: np.ndarray) -> None:
        """A prefilled row joins: the shorter caches are left-padded with zero columns, masked out (the decoder's
        additive mask is finfo.min there, whose exp is 0), so padding adds exactly nothing."""
        mask = mask[None]
        if not self.rows:
            self.past, self.mask = past, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.past = {k: np.concatenate([_left_pad(self.past[k], width), _left_pad(v, width)], axis=0)
                     for k, v in past.items()}
        self.mask = np.concatenate([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)], axis=0)

    # -- ORT-native -------------------------------------------------------------------------------------------
    def open_buffer(self, bundle: "Bundle", task, rows: int, capacity: int) -> None:
        from .backends.ort_kv import SharedKvBuffer

        session = bundle.runner("decoder", task).session
        self.buffer = SharedKvBuffer(session, bundle.num_layers, bundle.num_kv_heads, bundle.head_dim, rows, capacity)

    def _free_slot(self) -> int:
        free = [r for r in range(self.buffer.lengths.shape[0]) if r not in self.slots]
        if not free:
            raise VlexportError(f"the batch's KV buffer holds {len(self.slots)} rows and all are in use")
        return free[0]

    def native_prefill(self, bundle: "Bundle", task, pack, n_prefix: int, embeds, positions, chunk) -> np.ndarray:
        row = self._free_slot()
        self.reserve(n_prefix + embeds.shape[1])
        if pack is not None:
            self.buffer.fill_prefix(row, pack)
        else:
            self.buffer.clear(row)
        feed = bundle.slot_feed("decoder", task)  # the row alone: one row of slot inputs
        n = embeds.shape[1]
        chunk = chunk or n
        for start in range(0, n, chunk):
            logits = self.buffer.prefill(row, embeds[:, start:start + chunk], positions[:, start:start + chunk], feed)
        self.slots.append(row)
        return logits

    def native_step(self, bundle: "Bundle", task, embeds, positions) -> np.ndarray:
        total = self.buffer.lengths.shape[0]
        self.reserve(int(self.lengths.max()) + 1)
        if self.slots == list(range(total)):
            full_embeds, full_pos, active = embeds, positions, None
        else:  # buffer rows no request holds run too (one graph run for the batch), masked out by `active`
            full_embeds = np.zeros((total, 1, embeds.shape[2]), np.float32)
            full_pos = np.zeros((total, 1), np.int64)
            full_embeds[self.slots], full_pos[self.slots] = embeds, positions
            active = np.zeros(total, bool)
            active[self.slots] = True
        logits = self.buffer.step(full_embeds, full_pos, self.decoder_feed(bundle), active)
        return logits[self.slots, -1]

    def decoder_feed(self, bundle: "Bundle") -> dict:
        """The decoder's slot inputs for a step: each row its own task's adapters, or, in the ORT-native form, one
        row for all when they agree. Built once per change of the batch's rows, not per step."""
        if self.form == "ort-native":
            # Buffer rows no request holds run masked out: they take an active row's task, so that rows of one
            # task keep the one broadcast row of slot inputs.
            owner = dict(zip(self.slots, self.tasks))
            spare = self.tasks[0] if self.tasks else None
            row_tasks = tuple(owner.get(r, spare) for r in range(self.buffer.lengths.shape[0]))
        else:
            row_tasks = tuple(self.tasks)
        if self._feed is not None and self._feed[0] == row_tasks:
            return self._feed[1]
        if len(set(row_tasks)) == 1:
            feed = bundle.slot_feed("decoder", row_tasks[0])
            if self.form != "ort-native":  # the portable graph takes one row of slot inputs per batch row
                feed = lora_slots.repeat_rows(feed, len(row_tasks))
        else:
            rows = [bundle.slot_feed("decoder", t) for t in row_tasks]
            feed = lora_slots.stack_rows(rows, *lora_slots.slot_axes(rows[0])) if rows[0] else {}
        self._feed = (row_tasks, feed)
        return feed

    def reserve(self, length: int) -> None:
        """Make room for `length` tokens per row: past the buffer's capacity, a buffer twice as large (or as large as
        needed) takes the rows, each copied once, so a growing row costs amortised O(1) copies per token."""
        old = self.buffer
        if length <= old.capacity:
            return
        from .backends.ort_kv import SharedKvBuffer

        kv, hd = old.arrays[0].shape[1], old.arrays[0].shape[3]
        self.buffer = SharedKvBuffer(old.session, old.num_layers, kv, hd, old.rows, max(length, 2 * old.capacity))
        for row in self.slots:
            if old.lengths[row]:
                self.buffer.fill_prefix(row, old.row_cache(row))

    # -- both -------------------------------------------------------------------------------------------------
    def keep(self, keep: list[int]) -> None:
        """Only these rows (indices into the batch) stay; the others leave and free their cache."""
        if len(keep) == self.rows:
            return
        self.tasks = [self.tasks[i] for i in keep]
        self.positions = self.positions[keep]
        self.logits = self.logits[keep] if self.logits is not None else None
        if self.form == "ort-native":
            for i, row in enumerate(self.slots):
                if i not in keep:
                    self.buffer.clear(row)
            self.slots = [self.slots[i] for i in keep]
            return
        if not keep:
            self.past, self.mask = {}, np.zeros((0, 0), np.int64)
            return
        idx = np.array(keep)
        mask = self.mask[idx]
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if used.size else mask.shape[1]  # columns no row uses any more are trimmed
        self.mask = np.ascontiguousarray(mask[:, start:])
        self.past = {k: np.ascontiguousarray(v[idx][:, :, start:]) for k, v in self.past.items()}

    def rewind(self, steps: int) -> None:
        """Forget the last `steps` tokens of every row (each row must have taken that many steps)."""
        if steps <= 0:
            return
        self.positions = self.positions - steps
        if self.form == "ort-native":
            self.buffer.lengths[self.slots] -= steps
        else:
            self.mask = self.mask[:, :-steps]
            self.past = {k: v[:, :, :-steps] for k, v in self.past.items()}


def _left_pad(a: np.ndarray, width: int) -> np.ndarray:
    n = width - a.shape[2]
    if n == 0:
        return a
    return np.concatenate([np.zeros((*a.shape[:2], n, a.shape[3]), a.dtype), a], axis=2)


def _left_pad_mask(m: np.ndarray, width: int) -> np.ndarray:
    n = width - m.shape[1]
    return m if n == 0 else np.concatenate([np.zeros((m.shape[0], n), m.dtype), m], axis=1)


class Bundle:
    """A loaded bundle. `generate` answers one question about one image."""

    def __init__(self, path: str | Path, threads: int | None = None, manifest: dict | None = None,
                 backend: str = "onnxruntime"):
        """`manifest` is given only while a build is still writing the bundle; otherwise it is read and every
        file's sha256 is checked. backend "tensorrt" runs the engines `vlexport engines` built on the device."""
        from tokenizers import Tokenizer

        check_threads(threads)
        self.path = Path(path)
        self.manifest = manifest if manifest is not None else read_manifest(self.path)
        m = self.manifest
        self.backend = backend
        self.runners = _runners(self.path, m, backend, threads)
        self.tokenizer = Tokenizer.from_file(str(bundle_file(self.path, m["tokenizer"]["file"], "manifest tokenizer.file")))
        # A tokenizer.json may carry truncation or padding settings: a long prompt must be counted, never cut.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.image_spec = ImageSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["preprocessing"]["image"].items()})
        self.chat_template = (bundle_file(self.path, m["chat_template"]["file"], "manifest chat_template.file").read_text()
                              if m.get("chat_template") else None)
        model = m["model"]
        self.image_token = m["tokenizer"]["image_token"]
        self.image_token_id = model["image_token_id"]
        self.num_image_tokens = model["num_image_tokens"]
        # LLaVA-NeXT: an image's token count depends on its size (vlexport/anyres.py); None for LLaVA-1.5.
        self.anyres = _anyres(model.get("anyres"), self.image_spec)
        self.eos_ids = set(m["generation"]["eos_token_ids"])
        self.num_layers, self.num_kv_heads, self.head_dim = model["num_layers"], model["num_kv_heads"], model["head_dim"]
        self.hidden_size = model["hidden_size"]
        # Task packs are small (a prefix is P x layers x 2 x kv x hd floats): load them all now, so that switching
        # tasks between requests is a dictionary lookup.
        self.tasks = m.get("tasks") or {}
        self._packs = {name: _load_pack(bundle_file(self.path, t["pack"], f"manifest tasks.{name}.pack"))
                       for name, t in self.tasks.items()}
        # Tasks with a LoRA/BitFit merged for them alone have their own copies of the parts it changes; all are
        # opened now so that switching stays a lookup.
        self._task_runners = {
            name: {part: OrtRunner(bundle_file(self.path, f, f"manifest tasks.{name}.parts.{part}"), threads)
                   for part, f in t.get("parts", {}).items()}
            for name, t in self.tasks.items() if t.get("parts")
        }
        if self._task_runners and backend != "onnxruntime":
            raise VlexportError("tasks with their own merged parts run on ONNX Runtime only for now")
        # Adapter slots (bottleneck, LoRA), if the parts have them: every run feeds the task's weights, or "no adapter".
        self.slots = m.get("slots") or {}
        self.lora_slots = m.get("lora_slots") or {}
        self._no_adapter = {part: lora_slots.no_adapter_feed(self.slots, self.lora_slots, part)
                            for part in sorted(set(self.slots) | set(self.lora_slots))}
        self._slot_feeds: dict = {}
        self.max_position_embeddings = model.get("max_position_embeddings")
        # Prefill in chunks of this many tokens (None: the whole prompt in one decoder run, which measured faster;
        # see bench/results/2026-12-02-epyc-2core/prefill-chunks.md).
        self.prefill_chunk: int | None = None
        self.context = ((m.get("target") or {}).get("shapes") or {}).get("context")
        self.max_prompt_tokens = None
        if backend == "tensorrt":  # engine profiles end at the target's largest prompt
            prompt_tokens = ((m.get("target") or {}).get("shapes") or {}).get("prompt_tokens")
            self.max_prompt_tokens = prompt_tokens[-1] if isinstance(prompt_tokens, list) and prompt_tokens else None

    # -- text -------------------------------------------------------------------------------------------------
    def chat_prompt(self, prompt: str) -> str:
        if not self.chat_template:
            raise VlexportError(f"bundle '{self.path}' has no chat template; use --raw-prompt with an {self.image_token} placeholder")
        tok = self.manifest["tokenizer"]
        return render_chat_prompt(self.chat_template, prompt, tok.get("bos_token"), tok.get("eos_token"))

    def image_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        """How many image tokens the prompt's one placeholder expands to (image_size (height, width): any-res)."""
        if self.anyres is None:
            return self.num_image_tokens
        if image_size is None:
            raise VlexportError(f"bundle '{self.path}' is LLaVA-NeXT: an image's token count depends on its size, "
                                "so give the image (its size) with the prompt")
        return self.anyres[0].num_image_tokens(tuple(image_size))

    def image_size_of(self, image) -> tuple[int, int] | None:
        """(height, width) of an image (path or PIL) for any-res bundles; None for LLaVA-1.5 (not needed)."""
        if self.anyres is None or image is None:
            return None
        if isinstance(image, (str, Path)):
            image = open_image(image)
        if isinstance(image, np.ndarray):
            return int(image.shape[0]), int(image.shape[1])
        return int(image.height), int(image.width)

    def encode(self, text: str, image_size: tuple[int, int] | None = None) -> list[int]:
        n = text.count(self.image_token)
        if n != 1:
            raise VlexportError(
                f"the prompt must contain exactly one '{self.image_token}' placeholder for the image (found {n}); "
                "use --prompt to have the chat template add it"
            )
        return self.tokenizer.encode(expand_image_tokens(text, self.image_token, self.image_tokens(image_size))).ids

    def check_context(self, prompt_tokens: int, max_new_tokens: int, task: str | None = None) -> None:
        """Refuse a request whose prompt (image tokens included) plus max_new_tokens does not fit the bundle: its
        context (the target's shapes.context, counting a task's prefix) or the model's max_position_embeddings."""
        task = self.resolve_task(task)
        info = self.tasks.get(task) if task is not None else None
        n_prefix = int((info or {}).get("prefix_tokens") or 0)
        offset = int((info or {}).get("position_offset") or 0)
        need = n_prefix + prompt_tokens + max_new_tokens
        prefix = f" + {n_prefix} prefix tokens of task '{task}'" if n_prefix else ""
        what = (f"the prompt is {prompt_tokens} tokens ({self.num_image_tokens} of them for the image){prefix} and "
                f"--max-new-tokens is {max_new_tokens}: {need} tokens")
        fix = "shorten the prompt or lower --max-new-tokens"
        if self.context and need > int(self.context):
            name = (self.manifest.get("target") or {}).get("name", "?")
            raise VlexportError(f"{what}, over the bundle's context of {self.context} tokens (target '{name}' "
                                f"shapes.context); {fix}, or build for a target with a larger context")
        last_position = offset + prompt_tokens + max_new_tokens
        if self.max_position_embeddings and last_position > int(self.max_position_embeddings):
            raise VlexportError(f"{what}, over the model's max_position_embeddings of {self.max_position_embeddings}"
                                f"{f' (positions start at {offset})' if offset else ''}; {fix}")
        if self.max_prompt_tokens and n_prefix + prompt_tokens > int(self.max_prompt_tokens):
            raise VlexportError(f"the prompt is {prompt_tokens} tokens{prefix}, over the {self.max_prompt_tokens} "
                                "that the TensorRT engines' profiles take (target shapes.prompt_tokens); shorten the prompt")

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- image ------------------------------------------------------------------------------------------------
    def pixel_values(self, image) -> np.ndarray:
        """[1,3,S,S]; any-res bundles: the tiles [N,3,S,S], the global view first (N depends on the image)."""
        if isinstance(image, (str, Path)):
            image = open_image(image)
        if self.anyres is not None:
            from .anyres import preprocess_anyres

            return preprocess_anyres(image, self.anyres[1])[0]
        return preprocess_image(image, self.image_spec)[None]

    def release(self, part: str) -> None:
        """Close every session of `part` (the base's and each task's copy) where the backend can; each opens again
        on its next use."""
        for runners in (self.runners, *self._task_runners.values()):
            runner = runners.get(part)
            if runner is not None and hasattr(runner, "release"):
                runner.release()

    def runner(self, part: str, task: str | None):
        task = self.resolve_task(task)
        return self._task_runners.get(task, {}).get(part) or self.runners[part]

    def image_features(self, pixel_values: np.ndarray, task: str | None = None,
                       image_size: tuple[int, int] | None = None) -> np.ndarray:
        # The vision graph is portable: one row of slot inputs per image (lora_slots.py).
        feed = {"pixel_values": pixel_values,
                **lora_slots.repeat_rows(self.slot_feed("vision", task), pixel_values.shape[0])}
        if self.anyres is not None:  # LLaVA-NeXT: the graph packs the tiles' features by this plan (export/parts.py)
            from .anyres import pack_plan

            if image_size is None:
                raise VlexportError(f"bundle '{self.path}' is LLaVA-NeXT: image_features needs the image's size "
                                    "(height, width) to pack its tiles' features")
            feed["pack_index"], feed["pack_weight"] = pack_plan(tuple(image_size), self.anyres[0],
                                                                num_tiles=pixel_values.shape[0])
        return self.runner("vision", task).infer(feed)["image_features"]

    def resolve_task(self, task: str | None) -> str | None:
        """No task on a bundle with a 'default' task means that task."""
        if task is None and "default" in self.tasks:
            return "default"
        if task is not None and task not in self.tasks:
            known = ", ".join(self.tasks) or "none"
            raise VlexportError(f"unknown --task '{task}': bundle '{self.path}' has tasks: {known}")
        return task

    def slot_feed(self, part: str, task: str | None) -> dict:
        """The part's slot inputs for one task (one row), "no adapter" where the task feeds nothing there."""
        if part not in self._no_adapter:
            return {}
        task = self.resolve_task(task)
        key = (part, task)
        if key not in self._slot_feeds:  # built once per task and part: switching stays a lookup
            pack = self._packs.get(task, {}) if task is not None else {}
            self._slot_feeds[key] = lora_slots.one_rank(
                {name: pack.get(name, empty) for name, empty in self._no_adapter[part].items()})
        return self._slot_feeds[key]

    # -- the KV loop: the only place that feeds the decoder ---------------------------------------------------
    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return {
            f"past_key_values.{i}.{kv}": np.zeros(shape, np.float32)
            for i in range(self.num_layers) for kv in ("key", "value")
        }

    def prefix(self, task: str | None) -> tuple[dict | None, int, int]:
        """(prefix keys/values [kv, P, hd] per past name or None, prefix length P, position of the first real token)."""
        task = self.resolve_task(task)
        info = self.tasks.get(task) if task is not None else None
        if not info or not info.get("prefix_tokens"):
            return None, 0, 0
        pack = self._packs[task]
        return {k: pack[k] for k in self.empty_past()}, int(info["prefix_tokens"]), int(info["position_offset"])

    def decoder_group(self, task: str | None) -> str:
        """Tasks with the same key run the same decoder graph, so their rows may share one decode step (a mixed
        batch). What a task feeds at run time is per row: prefix KV entries and positions, and LoRA and bottleneck
        slot weights (KvState.decoder_feed). Only a task with its own merged decoder or embed part has a key of its own."""
        task = self.resolve_task(task)
        info = (self.tasks.get(task) or {}) if task is not None else {}
        return f"task:{task}" if {"decoder", "embed"} & set(info.get("parts") or {}) else ""

    def decoder_form(self, task: str | None = None) -> str:
        """"ort-native" (fused attention over a shared KV buffer, ONNX Runtime only) or "portable" (past -> present
        concatenated; TensorRT engines and bundles built before the form existed)."""
        if self.backend != "onnxruntime":
            return "portable"
        task = self.resolve_task(task)
        info = (self.tasks.get(task) or {}) if task is not None else {}
        if "decoder" in (info.get("parts") or {}):
            return (info.get("forms") or {}).get("decoder", "portable")
        return self.manifest["parts"]["decoder"].get("form", "portable")

    def embed(self, ids: np.ndarray, features: np.ndarray | None, task: str | None = None) -> np.ndarray:
        if features is None:
            features = np.zeros((0, self.hidden_size), np.float32)
        return self.runner("embed", task).infer({"input_ids": ids, "image_features": features})["inputs_embeds"]

    def prefill(self, ids, features: np.ndarray | None = None, task: str | None = None,
                into: "KvState | None" = None, capacity: int | None = None, rows: int = 1) -> "KvState":
        """Run the decoder over a prompt (token ids, image tokens included) from the task's prefix; the row's
        first logits are the state's `logits[-1]`. `into` adds the row to a running batch (same decoder group)
        and returns that state; otherwise a new state is made, with room for `rows` rows of up to `capacity` tokens
        (prefix included) where the decoder form preallocates its cache (default: the prompt plus 256)."""
        task = self.resolve_task(task)
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        pack, n_prefix, offset = self.prefix(task)
        embeds = self.embed(ids, features, task)
        positions = offset + np.arange(n, dtype=np.int64)[None]
        if into is None:
            form = self.decoder_form(task)
            into = KvState(group=self.decoder_group(task), form=form, task=task)
            if form == "ort-native":
                into.open_buffer(self, task, rows=rows, capacity=capacity or (n_prefix + n + 256))
        elif into.group != self.decoder_group(task):
            raise VlexportError(f"task {task!r} runs the decoder with other weights than the batch's "
                                f"({into.task!r}); give it a batch of its own (Bundle.decoder_group)")
        if into.form == "ort-native":
            logits = into.native_prefill(self, task, pack, n_prefix, embeds, positions, self.prefill_chunk)
        else:
            logits, past = self._portable_prefill(embeds, positions, pack, n_prefix, task)
            into.add_portable_row(past, np.ones(n_prefix + n, np.int64))
        into.tasks.append(task)
        into.positions = np.append(into.positions, offset + n).astype(np.int64)
        into.logits = logits[:, -1] if into.logits is None else np.concatenate([into.logits, logits[:, -1]])
        return into

    def _portable_prefill(self, embeds, positions, pack, n_prefix: int, task):
        """One-shot or in chunks of `prefill_chunk` tokens, each chunk attending to the cache so far."""
        past = ({k: np.ascontiguousarray(v[None]) for k, v in pack.items()} if pack is not None else self.empty_past())
        n = embeds.shape[1]
        chunk = self.prefill_chunk or n
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            mask = np.ones((1, n_prefix + stop), np.int64)
            logits, past = self._run_decoder(embeds[:, start:stop], mask, positions[:, start:stop], past, task)
        return logits, past

    def _run_decoder(self, embeds, attention_mask, position_ids, past: dict, task, feed: dict | None = None):
        """feed: the slot inputs (default: the task's, one row)."""
        out = self.runner("decoder", task).infer(
            {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids, **past,
             **(self.slot_feed("decoder", task) if feed is None else feed)}
        )
        present = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")}
        return out["logits"], present

    def step(self, state: "KvState", tokens) -> np.ndarray:
        """Feed each row of the batch its next token; the logits [rows, vocab] that follow, also kept in
        state.logits. Every row keeps its own position."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        if tokens.shape[0] != state.rows:
            raise ValueError(f"step got {tokens.shape[0]} tokens for a batch of {state.rows} rows")
        task = state.task
        embeds = self.embed(tokens, None, task)
        positions = state.positions[:, None]
        if state.form == "ort-native":
            logits = state.native_step(self, task, embeds, positions)
        else:
            mask = np.concatenate([state.mask, np.ones((state.rows, 1), np.int64)], axis=1)
            logits, state.past = self._run_decoder(embeds, mask, positions, state.past, task, state.decoder_feed(self))
            state.mask = mask
            logits = logits[:, -1]
        state.positions = state.positions + 1
        state.logits = logits
        return logits

    def teacher_forced_logits(self, prompt_ids: list[int], features: np.ndarray | None, continuation: list[int],
                              task: str | None = None) -> np.ndarray:
        """The logits that predict each continuation token: prefill, then one step per teacher-forced token."""
        state = self.prefill(prompt_ids, features, task, capacity=len(prompt_ids) + len(continuation)
                             + self.prefix(task)[1])
        rows = [state.logits[0]]
        for token in continuation[:-1]:
            rows.append(self.step(state, [token])[0])
        return np.stack(rows)

    def prepare(self, prompt: str | None, raw_prompt: str | None, max_new_tokens: int, task: str | None,
                image_size: tuple[int, int] | None = None) -> list[int]:
        """The prompt's token ids for one request, every check made before the image is read or a cache
        allocated."""
        if (prompt is None) == (raw_prompt is None):
            raise VlexportError("give exactly one of --prompt (chat template applied) or --raw-prompt (used verbatim)")
        self.resolve_task(task)
        text = self.chat_prompt(prompt) if prompt is not None else raw_prompt
        ids = self.encode(text, image_size)
        self.check_context(len(ids), max_new_tokens, task)
        self.check_image_tokens(ids, None if image_size is None else self.image_tokens(image_size))
        return ids

    def check_image_tokens(self, ids: list[int], n_features: int | None = None) -> None:
        n_image = ids.count(self.image_token_id)
        want = self.num_image_tokens if n_features is None else n_features
        if n_image != want:
            # The embed graph would silently fill unmatched positions with zeros.
            source = "the bundle's vision part gives" if n_features is None else "the image gave"
            raise VlexportError(
                f"the prompt has {n_image} image tokens but {source} {want} features; write the image as one "
                f"'{self.image_token}' placeholder and let vlexport expand it"
            )

    def features_for(self, image, ids: list[int], task: str | None) -> np.ndarray:
        features = self.image_features(self.pixel_values(image), task, self.image_size_of(image))
        self.check_image_tokens(ids, features.shape[0])
        return features

    def generate(
        self,
        image,
        prompt: str | None = None,
        raw_prompt: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        task: str | None = None,
        release_vision: bool = False,
    ) -> Generation:
        """release_vision: close the vision session once the image is encoded, before the decoder's opens (sessions
        open on first use), so that the decoder reuses its memory: for one-shot callers such as `vlexport run`
        (a 7B at INT4 peaks about 1.4 GB lower). The next image opens it again."""
        check_sampling(max_new_tokens, temperature, top_p)
        t0 = time.perf_counter()
        if self.anyres is not None:  # the prompt's image tokens depend on the image's size: read it first
            image = open_image(image) if isinstance(image, (str, Path)) else image
        size = self.image_size_of(image)
        ids = self.prepare(prompt, raw_prompt, max_new_tokens, task, size)
        pixels = self.pixel_values(image)
        t1 = time.perf_counter()
        features = self.image_features(pixels, task, size)
        if release_vision:
            self.release("vision")
        self.check_image_tokens(ids, features.shape[0])
        t2 = time.perf_counter()
        rng = np.random.default_rng(seed)
        state = self.prefill(ids, features, task, capacity=self.prefix(task)[1] + len(ids) + max_new_tokens)
        t3 = time.perf_counter()
        new: list[int] = []
        while True:
            token = pick_token(state.logits[0], temperature, top_p, rng)
            new.append(token)
            if token in self.eos_ids or len(new) >= max_new_tokens:
                break
            self.step(state, [token])
        t4 = time.perf_counter()
        timings = {
            "preprocess_ms": 1000 * (t1 - t0),
            "vision_ms": 1000 * (t2 - t1),
            "prefill_ms": 1000 * (t3 - t2),
            "decode_ms_per_token": 1000 * (t4 - t3) / max(1, len(new) - 1),
            "total_ms": 1000 * (t4 - t0),
            "prompt_tokens": len(ids),
            "new_tokens": len(new),
            "task": self.resolve_task(task),
        }
        return Generation(text=self.decode(new), token_ids=new, prompt_ids=ids, timings=timings)

    def generate_batch(self, requests: list[Request], max_batch: int | None = None) -> list[Generation]:
        """Greedy answers to many requests, decoded together: rows of different tasks (base included) share each
        decode step wherever they run the same decoder graph (decoder_group), each row fed its own task's prefix,
        LoRA and bottleneck weights. Every request is checked before any runs. Results are in input order, and
        each row's tokens are those of its request run alone. max_batch: most rows per decode step (None: all)."""
        if not requests:
            return []
        prepared = []
        for i, r in enumerate(requests):
            if not isinstance(r, Request):
                raise VlexportError(f"request {i + 1}: expected a vlexport.Request, got {type(r).__name__}")
            try:
                check_sampling(r.max_new_tokens, 0.0, 1.0)
                image = None
                if self.anyres is not None:  # its size sets the prompt's image tokens
                    image = open_image(r.image) if isinstance(r.image, (str, Path)) else r.image
                ids = self.prepare(r.prompt, r.raw_prompt, r.max_new_tokens, r.task, self.image_size_of(image))
                if image is None:
                    image = open_image(r.image) if isinstance(r.image, (str, Path)) else r.image  # read before any runs
            except VlexportError as e:
                raise VlexportError(f"request {i + 1}: {e}") from None
            prepared.append((i, ids, self.resolve_task(r.task), image))
        groups: dict[str, list] = {}
        for entry in prepared:
            groups.setdefault(self.decoder_group(entry[2]), []).append(entry)
        results: dict[int, Generation] = {}
        size = max_batch or len(requests)
        for members in groups.values():
            for start in range(0, len(members), size):
                self._decode_together(members[start:start + size], requests, results)
        return [results[i] for i in range(len(requests))]

    def _decode_together(self, members: list, requests: list[Request], results: dict) -> None:
        """Prefill each member into one state, then step all rows at once; a row leaves when it is done."""
        t0 = time.perf_counter()
        capacity = max(self.prefix(task)[1] + len(ids) + requests[i].max_new_tokens for i, ids, task, _ in members)
        state = None
        for i, ids, task, image in members:
            features = self.features_for(image, ids, task)
            state = self.prefill(ids, features, task, into=state, capacity=capacity, rows=len(members))
        t1 = time.perf_counter()
        active = list(members)
        new = {i: [] for i, *_ in members}
        while active:
            tokens = [int(np.argmax(state.logits[k])) for k in range(len(active))]
            keep = []
            for k, ((i, *_), token) in enumerate(zip(active, tokens)):
                new[i].append(token)
                if token not in self.eos_ids and len(new[i]) < requests[i].max_new_tokens:
                    keep.append(k)
            if not keep:
                break
            state.keep(keep)
            active = [active[k] for k in keep]
            self.step(state, [tokens[k] for k in keep])
        t2 = time.perf_counter()
        for i, ids, task, _ in members:
            results[i] = Generation(text=self.decode(new[i]), token_ids=new[i], prompt_ids=ids,
                                    timings={"batch_rows": len(members), "batch_ms": 1000 * (t2 - t0),
                                             "batch_prefill_ms": 1000 * (t1 - t0), "batch_decode_ms": 1000 * (t2 - t1),
                                             "prompt_tokens": len(ids), "new_tokens": len(new[i]), "task": task})


def check_threads(threads) -> None:
    """None (every core this process may use) or a whole number >= 1."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise VlexportError(f"--threads {threads!r} is not a number of CPU threads: give a whole number of at least 1, "
                            "or leave --threads out to use every core this process may use")


def check_sampling(max_new_tokens, temperature, top_p) -> None:
    """Generation options, each refused by name: max_new_tokens >= 1, temperature >= 0 (0 = greedy), top_p in (0, 1]."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise VlexportError(f"--max-new-tokens must be a whole number of at least 1 (got {max_new_tokens!r})")
    try:
        temperature, top_p = float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise VlexportError(f"--temperature {temperature!r} and --top-p {top_p!r} must be numbers") from None
    if not math.isfinite(temperature) or temperature < 0:
        raise VlexportError(f"--temperature {temperature:g} is not allowed: give 0 for greedy decoding or a positive "
                            "number to sample (1 = the model's own distribution)")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise VlexportError(f"--top-p {top_p:g} is outside (0, 1]: it is the probability mass sampled from (1 = all "
                            "tokens; 0 would keep no token); give a --top-p in (0, 1]")


def _anyres(entry: dict | None, tile_spec: ImageSpec):
    """(AnyResGeometry, AnyResSpec) from the manifest's model.anyres, or None (LLaVA-1.5)."""
    if not entry:
        return None
    from .anyres import AnyResGeometry, AnyResSpec

    pinpoints = tuple(tuple(int(v) for v in p) for p in entry["grid_pinpoints"])
    geometry = AnyResGeometry(entry["family"], pinpoints, int(entry["tile"]), int(entry["patch"]),
                              newline=bool(entry.get("newline", True)))
    return geometry, AnyResSpec(entry["family"], tile_spec, pinpoints, int(entry["tile"]), tuple(entry["base_hw"]))


def _load_pack(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _runners(path: Path, manifest: dict, backend: str, threads: int | None) -> dict:
    """One runner per part; every runner has infer(feed) -> dict of arrays."""
    if backend == "onnxruntime":
        return {name: OrtRunner(bundle_file(path, part["file"], f"manifest parts.{name}.file"), threads)
                for name, part in manifest["parts"].items()}
    if backend != "tensorrt":
        raise VlexportError(f"unknown --backend '{backend}': choose onnxruntime or tensorrt")
    from .engines import open_engines

    # Each engine is checked against this bundle's ONNX (graph and weights), TensorRT version and GPU first.
    return open_engines(path, manifest)


def pick_token(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.cumsum(probs[order]) - probs[order] < top_p  # smallest set whose mass reaches top_p
    kept = order[keep]
    p = probs[kept] / probs[kept].sum()
    return int(rng.choice(kept, p=p))


def load(path: str | Path, threads: int | None = None, backend: str = "onnxruntime") -> Bundle:
    return Bundle(path, threads=threads, backend=backend)
