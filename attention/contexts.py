from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ImageContext:
    """One image prompt as seen by one attention call.

    k, v: (Bc, Lk, H*D) in the "blc" layout or (Bc, H, Lk, D) in "bhld".
      Bc is either the query batch B, or the number of distinct context rows that
      `batch_index` selects from (e.g. 2: positive and negative image tokens).
    weight: scalar multiplier of this context's attention output.
    mask: optional (B, Lq) or (1, Lq) float weights per query row, already on the
      token grid of the query (see masks.mask_to_tokens).
    batch_index: optional (B,) int64 tensor: query batch row b attends to context row
      batch_index[b]. Lets cond and uncond rows read different tokens without copying K/V.
    """

    k: torch.Tensor
    v: torch.Tensor
    weight: float = 1.0
    mask: Optional[torch.Tensor] = None
    batch_index: Optional[torch.Tensor] = None

    def rows_for(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V expanded to the query batch (a gather, used by the torch path only)."""
        k, v = self.k, self.v
        if self.batch_index is not None:
            return k.index_select(0, self.batch_index), v.index_select(0, self.batch_index)
        if k.shape[0] == batch:
            return k, v
        if k.shape[0] == 1:
            return k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])
        raise ValueError(
            f"image context has {k.shape[0]} rows but the query batch is {batch}; "
            "pass batch_index to say which context row each query row uses"
        )
