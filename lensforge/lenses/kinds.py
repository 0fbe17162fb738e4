"""The three lens types: logit (identity), tuned (full rank), LoRA-Lens (low rank)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lensforge.errors import ConfigError
from lensforge.lenses.base import Lens, LensConfig


class LogitLens(Lens):
    """z_l = W_U norm(h_l): no parameters."""

    lens_type = "logit"

    def delta(self, h: Tensor, idx: int) -> Tensor:
        return torch.zeros_like(h)

    def delta_all(self, hs: Tensor) -> Tensor:
        return torch.zeros_like(hs)

    def transform_hidden(self, h: Tensor, idx: int) -> Tensor:
        self._check(h, idx)
        return h


class TunedLens(Lens):
    """z_l = W_U norm(h_l + W_l h_l + b_l), W_l in R^{HxH}.

    Zero-initialized, so an untrained tuned lens *is* the logit lens, and weight decay
    pulls toward the identity map rather than toward zero. `weight[l]` uses nn.Linear's
    convention (delta = h @ W^T + b), the same as tuned-lens checkpoints.
    """

    lens_type = "tuned"

    def __init__(self, config: LensConfig) -> None:
        super().__init__(config)
        L, H = config.n_layers, config.hidden_size
        self.weight = nn.Parameter(torch.zeros(L, H, H))
        self.bias = nn.Parameter(torch.zeros(L, H)) if config.bias else None

    def delta(self, h: Tensor, idx: int) -> Tensor:
        w = self.weight[idx].to(h.dtype)
        b = None if self.bias is None else self.bias[idx].to(h.dtype)
        return nn.functional.linear(h, w, b)

    def delta_all(self, hs: Tensor) -> Tensor:
        out = torch.bmm(hs, self.weight.to(hs.dtype).transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.to(hs.dtype)[:, None, :]
        return out

    def translator_matrix(self, idx: int) -> Tensor:
        """W_l as an [H, H] matrix (for spectral analysis)."""
        return self.weight[idx].detach()


class LowRankLens(Lens):
    """LoRA-Lens: z_l = W_U norm(h_l + A_l B_l h_l + b_l), A_l in R^{Hxr}, B_l in R^{rxH}.

    r = rank, or floor(H / k) with k = 32 by default. A starts at zero and B random (as
    in LoRA), so the lens starts equal to the logit lens yet A gets gradient at step 1.
    """

    lens_type = "lowrank"

    def __init__(self, config: LensConfig, *, rank: int | None = None, k: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(config)
        H = config.hidden_size
        r = resolve_rank(H, rank if rank is not None else config.rank, k)
        config.rank = r
        L = config.n_layers
        gen = torch.Generator().manual_seed(seed)
        self.up = nn.Parameter(torch.zeros(L, H, r))  # A_l
        self.down = nn.Parameter(torch.randn(L, r, H, generator=gen) / math.sqrt(H))  # B_l
        self.bias = nn.Parameter(torch.zeros(L, H)) if config.bias else None

    @property
    def rank(self) -> int:
        return self.up.shape[-1]

    def delta(self, h: Tensor, idx: int) -> Tensor:
        z = h @ self.down[idx].to(h.dtype).T
        out = z @ self.up[idx].to(h.dtype).T
        if self.bias is not None:
            out = out + self.bias[idx].to(h.dtype)
        return out

    def delta_all(self, hs: Tensor) -> Tensor:
        z = torch.bmm(hs, self.down.to(hs.dtype).transpose(1, 2))
        out = torch.bmm(z, self.up.to(hs.dtype).transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.to(hs.dtype)[:, None, :]
        return out

    def translator_matrix(self, idx: int) -> Tensor:
        """A_l B_l as an [H, H] matrix."""
        return (self.up[idx] @ self.down[idx]).detach()


def resolve_rank(hidden_size: int, rank: int | None, k: int | None) -> int:
    """r = rank if given, else floor(H / k) (k defaults to 32). Validates 1 <= r <= H."""
    if rank is None:
        k = 32 if k is None else k
        if k < 1:
            raise ConfigError(f"rank divisor k must be >= 1, got {k}")
        rank = hidden_size // k
    if not 1 <= rank <= hidden_size:
        raise ConfigError(f"rank must be between 1 and the hidden size {hidden_size}, got {rank}")
    return rank


LENS_TYPES: dict[str, type[Lens]] = {
    LogitLens.lens_type: LogitLens,
    TunedLens.lens_type: TunedLens,
    LowRankLens.lens_type: LowRankLens,
}
