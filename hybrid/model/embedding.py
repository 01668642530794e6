"""The token-embedding table, kept in host memory.

A step needs one row of the table per token (4 KB each for V2-Lite), so the table (vocab x hidden: 0.39 GiB in bf16)
stays out of the GPU budget, which the expert cache gets instead; llama.cpp keeps it on the host too. The rows are
gathered on the host and copied to the compute device through pinned memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F

EMBED = "model.embed_tokens.weight"


class TokenEmbedding:
    def __init__(self, table: torch.Tensor, device):
        self.table = table.cpu()                                                          # [V, Hd]
        self.device = torch.device(device)

    def __call__(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] (best on the host) -> rows [B, T, Hd] on the compute device, into `out` if given."""
        rows = F.embedding(ids.cpu(), self.table)                                         # [B, T, Hd]
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        if out is None:
            return rows.to(self.device, non_blocking=True)
        return out.copy_(rows, non_blocking=True)
