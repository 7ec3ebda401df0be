"""The PyTorch reference: the base with its adapters applied unmerged, as they were trained.

LoRA goes through PEFT itself (keys rewritten to transformers 5's layout first, since PEFT silently drops old-layout
projector keys). A BitFit dump is the trained values of the model's own bias parameters, so it is loaded into them.
PEFT BEFT goes through PEFT when it is the only PEFT kind; next to LoRA (PEFT cannot stack both types in one model)
its delta is added to the bias, which is exactly BEFT's forward (output + beft_bias).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..adapters import Adapter
from ..adapters.bitfit import BitFitAdapter
from ..adapters.lora import LoraAdapter
from ..model import load_llava


def build_reference(base: Path, adapters: list[Adapter], num_text_layers: int | None = None):
    """num_text_layers keeps only the first decoder layers, and the adapter entries that live in them."""
    model = load_llava(base, num_text_layers)
    if num_text_layers is not None:
        adapters = [a.without_text_layers_from(num_text_layers) for a in adapters]
    loras = [a for a in adapters if isinstance(a, LoraAdapter)]
    befts = [a for a in adapters if isinstance(a, BitFitAdapter) and not a.absolute]
    for a in adapters:
        a.validate(model)
        if isinstance(a, BitFitAdapter) and (a.absolute or loras):
            a.merge_into(model)
    peft_adapters = loras or befts
    if not peft_adapters:
        return model
    from peft import PeftModel

    names = [f"adapter{i}" for i in range(len(peft_adapters))]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [_peft_dir(a, Path(tmp) / n) for a, n in zip(peft_adapters, names)]
        model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0])
        for d, n in zip(dirs[1:], names[1:]):
            model.load_adapter(str(d), adapter_name=n)
    if len(names) > 1:
        model.base_model.set_adapter(names)
    return model.eval()


def _peft_dir(adapter: Adapter, out: Path) -> Path:
    if isinstance(adapter, LoraAdapter):
        return adapter.write_peft_dir(out)
    return adapter.path if adapter.path.is_dir() else adapter.path.parent


def reference_generate(model, processor, image, text: str, max_new_tokens: int) -> list[int]:
    """Greedy tokens from HF generate (new tokens only)."""
    import torch

    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()
