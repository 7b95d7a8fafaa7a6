"""The torch modules that become the ONNX graphs: thin wrappers over `Mercury`.

Each wrapper only fixes the graph's inputs and outputs (names in docs/FORMAT.md); the model
code itself is `mercury_onnx.models`, so the ONNX graphs compute exactly what PyTorch does.

| wrapper   | inputs            | outputs                                              |
|-----------|-------------------|------------------------------------------------------|
| HeadGraph | images (B,3,H,W)  | tokens (B,P+K,D) f32, indices (B,K) i64              |
| Tok8Head  | images            | tokens (B,P+K,D) i8, scales (B,P+K,1) f32, indices   |
| Tok16Head | images            | tokens (B,P+K,D) f16, indices                        |
| TailGraph | tokens, indices   | logits (B,C)                                         |
| CodecHead | images            | codes (B,P+K,d) u8, indices (B,K) i64 (codec DxB)     |
| CodecTail | codes, indices    | logits (B,C): decode codes to tokens, then the tail  |
| FullGraph | images            | logits (B,C): the vanilla model, no pruning          |

P = the backbone's prefix tokens (timm's `num_prefix_tokens`; manifest "num_prefix_tokens").
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import Mercury

HEAD_IO = (["images"], ["tokens", "indices"])
TOK8_IO = (["images"], ["tokens", "scales", "indices"])
TAIL_IO = (["tokens", "indices"], ["logits"])
CODEC_HEAD_IO = (["images"], ["codes", "indices"])
CODEC_TAIL_IO = (["codes", "indices"], ["logits"])
FULL_IO = (["images"], ["logits"])


def quantize_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: scale = max|x| / 127 per token. (B,T,D) -> int8 (B,T,D), (B,T,1).

    Rounding is half-to-even in both torch.round and ONNX Round; dequantise as q * scale,
    the error per element is at most scale / 2."""
    scales = tokens.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0   # (B, T, 1)
    q = torch.round(tokens / scales).clamp(-127, 127).to(torch.int8)             # (B, T, D)
    return q, scales


class HeadGraph(nn.Module):
    def __init__(self, mercury: Mercury):
        super().__init__()
        self.m = mercury

    def forward(self, images):
        return self.m.forward_head(images)                               # (B,P+K,D), (B,K)


class Tok8Head(HeadGraph):
    def forward(self, images):
        tokens, indices = self.m.forward_head(images)
        q, scales = quantize_tokens(tokens)
        return q, scales, indices


class Tok16Head(HeadGraph):
    def forward(self, images):
        tokens, indices = self.m.forward_head(images)
        return tokens.to(torch.float16), indices


class TailGraph(nn.Module):
    def __init__(self, mercury: Mercury):
        super().__init__()
        self.m = mercury

    def forward(self, tokens, indices):
        return self.m.forward_tail(tokens, indices)                      # (B, C)


class CodecHead(HeadGraph):
    """The head + the token codec (models/codec.py): integer codes instead of tokens."""

    def __init__(self, mercury: Mercury, codec):
        super().__init__(mercury)
        self.codec = codec

    def forward(self, images):
        tokens, indices = self.m.forward_head(images)                    # (B,P+K,D), (B,K)
        return self.codec.encode(tokens, indices), indices               # (B,P+K,d) u8


class CodecTail(TailGraph):
    """Decode the codes (dequantise, project back to D, add the means), then the tail."""

    def __init__(self, mercury: Mercury, codec):
        super().__init__(mercury)
        self.codec = codec

    def forward(self, codes, indices):
        return self.m.forward_tail(self.codec.decode(codes, indices), indices)   # (B, C)


class FullGraph(nn.Module):
    def __init__(self, mercury: Mercury):
        super().__init__()
        self.backbone = mercury.backbone

    def forward(self, images):
        return self.backbone(images)                                     # (B, C)
