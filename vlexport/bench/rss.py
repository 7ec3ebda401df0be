"""A fresh process that loads one side (bundle or PyTorch) and generates 32 tokens, then prints its peak RSS.

VmHWM is read here rather than from the parent's wait4 rusage: ru_maxrss survives exec, so a child forked from a
large parent would report the parent's size.
"""

import sys
from pathlib import Path


def vm_hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(side: str, bundle_dir: str, threads: int, backend: str) -> None:
    import skimage.data
    from PIL import Image

    image = Image.fromarray(skimage.data.astronaut())
    if side == "bundle":
        from vlexport.runtime import Bundle

        b = Bundle(bundle_dir, threads=threads, backend=backend)
        b.generate(image, prompt="Describe the image.", max_new_tokens=32)
        print(vm_hwm_mb())
        return
    import torch
    from transformers import AutoProcessor

    from vlexport.backends.torch_reference import reference_generate
    from vlexport.bench.run import merged_torch_model
    from vlexport.bundle import read_manifest

    torch.set_num_threads(threads)
    manifest = read_manifest(Path(bundle_dir))
    model = merged_torch_model(manifest)
    processor = AutoProcessor.from_pretrained(manifest["base"]["path"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    reference_generate(model, processor, image, processor.apply_chat_template(messages, add_generation_prompt=True), 32)
    print(vm_hwm_mb())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
