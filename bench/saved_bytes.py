"""Bytes that autograd saves per token in one patched linear, on SmolLM2-135M's projection shapes.

    .venv/bin/python bench/saved_bytes.py

fastcl saves only the sketch s = x A^T: r numbers per token (64 bytes at r = 16 in fp32),
where a LoRA or a full linear saves x, d_in numbers per token.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import workloads as w
from fastcl.layers import FastLinear

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (d_in, d_out)


def main() -> None:
    print(f"| d_in x d_out | saved per token, rank {w.RANK} | x per token (what a LoRA saves) |")
    print("|---|---:|---:|")
    for d_in, d_out in SHAPES:
        base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
        layer = FastLinear(base, layer_index=0, rank=w.RANK, scale=1.0, seed=0, backend="torch")
        x = torch.randn(w.BATCH, w.SEQ, d_in, requires_grad=True)
        saved = w.saved_activation_bytes(lambda: layer(x).sum(), layer)
        tokens = w.BATCH * w.SEQ
        print(f"| {d_in}x{d_out} | {saved / tokens:.0f} B | {d_in * x.element_size()} B |")


if __name__ == "__main__":
    main()
