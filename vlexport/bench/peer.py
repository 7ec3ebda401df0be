"""onnxruntime-genai's model builder as a peer in `vlexport bench --peer onnxruntime-genai`.

The peer gets the same weights as the bundle: the bundle's base with its merged adapters, whose language model is
written as a Llama Hugging Face directory (LlamaForCausalLM's state dict and config, plus the base's tokenizer),
and built by the builder (`python -m onnxruntime_genai.models.builder`, from that local directory; it reads the
config with AutoConfig and the weights with from_pretrained, so nothing is fetched) at the bundle's decoder
precision: fp32 -> `-p fp32`, int8 -> `-p int8`, int4 -> `-p int4` with accuracy level 4. Both sides are timed
through their public generate-step API, the same way: a fresh state per round (vlexport's Bundle.prefill, the
peer's og.Generator + append_tokens), then single steps (Bundle.step + greedy pick; generate_next_token, which
runs the decoder on the last token and picks the next), in rounds that alternate between the two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import VlexportError

PEERS = ("onnxruntime-genai",)
# Bundle decoder precision -> the builder's arguments for the same weights on CPU.
BUILDER_PRECISION = {"fp32": ["-p", "fp32"], "int8": ["-p", "int8"],
                     "int4": ["-p", "int4", "--extra_options", "int4_accuracy_level=4"]}


def check_peer(peer: str | None) -> None:
    if peer is not None and peer not in PEERS:
        raise VlexportError(f"--peer '{peer}' is not known: choose {', '.join(PEERS)}")


def peer_precision(manifest: dict) -> str:
    """The builder precision for the bundle's decoder, refused by name where the builder has no CPU form."""
    precision = manifest["parts"]["decoder"]["precision"]
    if precision not in BUILDER_PRECISION:
        raise VlexportError(f"--peer onnxruntime-genai: the bundle's decoder is {precision}, which the model builder "
                            f"cannot build for CPU (it builds {', '.join(BUILDER_PRECISION)}); bench a cpu, cpu-int8 "
                            "or int4 bundle, or drop --peer")
    return precision


def write_llama_dir(model, base: Path, out: Path) -> Path:
    """The merged LLaVA's language model and LM head as a LlamaForCausalLM directory (weights, config, tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    import copy

    text_config = copy.deepcopy(model.config.text_config)
    if text_config.model_type != "llama":
        raise VlexportError(f"--peer onnxruntime-genai: the language model is '{text_config.model_type}', not llama")
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state.update({f"lm_head.{k}": v for k, v in model.lm_head.state_dict().items()})
    # A merged BitFit gives some Llama linears a bias (o_proj, down_proj); Llama's config has one switch per block
    # (attention_bias, mlp_bias), so the block's other linears get a zero bias: the same function.
    blocks = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp_bias": ("gate_proj", "up_proj", "down_proj")}
    for switch, names in blocks.items():
        if any(k.endswith(f".{n}.bias") for k in state for n in names):
            setattr(text_config, switch, True)
    with torch.device("meta"):
        llama = LlamaForCausalLM(text_config)
    for name, param in llama.named_parameters():
        if name not in state and name.endswith(".bias"):
            state[name] = torch.zeros(param.shape, dtype=torch.float32)
    llama.load_state_dict(state, assign=True, strict=True)
    llama.config.architectures = ["LlamaForCausalLM"]
    llama.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
    return out


def build_peer(llama_dir: Path, out: Path, precision: str, threads: int, log: Callable[[str], None]) -> Path:
    """Run the model builder on a local Llama directory; the decoder session gets `threads` intra-op threads."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(llama_dir), "-o", str(out),
           *BUILDER_PRECISION[precision][:2], "-e", "cpu", "-c", str(out.parent / "builder-cache"),
           *BUILDER_PRECISION[precision][2:]]
    log(f"building the peer: {' '.join(cmd[1:])}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # a local directory: never fetch
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        raise RuntimeError(f"onnxruntime-genai's model builder failed ({done.returncode}): {done.stderr[-3000:]}")
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=2))
    return out


class PeerSide:
    """The builder's model through onnxruntime-genai's generate-step API."""

    def __init__(self, model_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(model_dir))
        self.config = json.loads((Path(model_dir) / "genai_config.json").read_text())

    def generator(self, room: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=room, do_sample=False, batch_size=1)
        return self.og.Generator(self.model, params)

    def prefill_round(self, ids: np.ndarray, n: int) -> list[float]:
        """n prefills of the prompt, each in a fresh generator (made outside the timing)."""
        out = []
        for _ in range(n):
            g = self.generator(ids.size + 8)
            t = time.perf_counter()
            g.append_tokens(ids.astype(np.int32).reshape(-1))
            out.append(1000 * (time.perf_counter() - t))
            del g
        return out

    def decode_round(self, ids: np.ndarray, steps: int) -> list[float]:
        """`steps` decode steps after the prompt `ids`. The first generate_next_token only picks from the prompt's
        logits (append_tokens ran the decoder), so it is taken untimed; each later one runs the decoder once."""
        g = self.generator(ids.size + steps + 8)
        g.append_tokens(ids.astype(np.int32).reshape(-1))
        g.generate_next_token()
        out = []
        for _ in range(steps):
            t = time.perf_counter()
            g.generate_next_token()
            out.append(1000 * (time.perf_counter() - t))
        del g
        return out


def bundle_prefill_round(bundle, ids: np.ndarray, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        state = bundle.prefill(ids, None, capacity=ids.size + 8)
        int(np.argmax(state.logits[0]))
        out.append(1000 * (time.perf_counter() - t))
    return out


def bundle_decode_round(bundle, ids: np.ndarray, steps: int) -> list[float]:
    """The same as PeerSide.decode_round through the bundle's KV loop: a step and a greedy pick per token."""
    state = bundle.prefill(ids, None, capacity=ids.size + steps + 8)
    token = int(np.argmax(state.logits[0]))
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        token = int(np.argmax(bundle.step(state, [token])[0]))
        out.append(1000 * (time.perf_counter() - t))
    return out


def interleaved(ours: Callable[[], list[float]], theirs: Callable[[], list[float]], rounds: int) -> tuple:
    """(our samples, the peer's samples) from `rounds` rounds that alternate sides: each side sees the same
    machine state, and neither always runs first."""
    a, b = [], []
    for r in range(rounds):
        first, second = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        x = first()
        y = second()
        a, b = (a + x, b + y) if r % 2 == 0 else (a + y, b + x)
    return a, b
