"""The subset (top-k + sampled tail) KL against the exact fused loss and an fp64 oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from test_fast_loss import _hidden, _lenses, oracle_fp64, rel_err
from torch import Tensor, nn

from lensforge.lenses import LensConfig, TunedLens
from lensforge.lenses.readout import Readout
from lensforge.training.fast_loss import Workspace, fused_kl_loss_backward
from lensforge.training.subset_loss import (
    ChunkTarget,
    SubsetKL,
    subset_kl,
    subset_kl_loss_backward,
)

pytestmark = pytest.mark.unit  # library code on tiny models and plain data

RTOL = 1e-3


def _grads(lenses: dict) -> dict[str, list[Tensor]]:
    return {n: [p.grad.clone() for p in lens.parameters()] for n, lens in lenses.items()}


@pytest.mark.parametrize("family,exact_cross", [("llama", True), ("gemma2", True),
                                                ("phi", True), ("phi", False)])
def test_k_equal_vocab_is_exact(family: str, exact_cross: bool, tiny_adapter,
                                tiny_input_ids: Tensor) -> None:
    """k = V leaves no tail: values and gradients equal the fused exact loss."""
    adapter = tiny_adapter(family)
    hs, final_h = _hidden(adapter, tiny_input_ids)
    lenses, twins = _lenses(adapter), _lenses(adapter)
    want = fused_kl_loss_backward(twins, hs, final_h, adapter.unembed, scale=0.5)
    got = subset_kl_loss_backward(lenses, hs, final_h, adapter.unembed, scale=0.5,
                                  k=adapter.vocab_size, token_chunk=5,
                                  exact_cross=exact_cross, readout=Readout(adapter.unembed),
                                  generator=torch.Generator().manual_seed(0))
    for name in lenses:
        assert rel_err(got[name], want[name]) <= RTOL, (name, got[name], want[name])
        for p, q in zip(lenses[name].parameters(), twins[name].parameters(), strict=True):
            assert rel_err(p.grad, q.grad) <= RTOL


class _QuirkyUnembed(nn.Module):
    """RMSNorm + biased head with logit scale and a soft-cap that visibly bends logits."""

    def __init__(self, V: int, H: int, softcap: float | None, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.norm = nn.RMSNorm(H, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.copy_(1 + 0.3 * torch.randn(H, generator=gen))
        self.lm_head = nn.Linear(H, V, bias=True)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(V, H, generator=gen) * 0.5)
            self.lm_head.bias.copy_(torch.randn(V, generator=gen))
        self.logit_scale, self.softcap = 0.8, softcap

    @property
    def weight(self) -> Tensor:
        return self.lm_head.weight

    @property
    def bias(self) -> Tensor:
        return self.lm_head.bias

    def forward(self, h: Tensor) -> Tensor:
        z = self.lm_head(self.norm(h)) * self.logit_scale
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap


def _quirky_case(softcap: float | None, V: int = 96, H: int = 16, L: int = 3, N: int = 12,
                 seed: int = 0) -> tuple[dict, Tensor, Tensor, _QuirkyUnembed]:
    gen = torch.Generator().manual_seed(seed)
    unembed = _QuirkyUnembed(V, H, softcap, seed)
    lens = TunedLens(LensConfig(lens_type="tuned", n_layers=L, hidden_size=H, vocab_size=V))
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    hs = torch.randn(L, N, H, generator=gen)
    final_h = torch.randn(N, H, generator=gen)
    return {"tuned": lens}, hs, final_h, unembed


@pytest.mark.parametrize("softcap", (None, 3.0))
def test_quirks_exact_against_fp64_oracle(softcap: float | None) -> None:
    """Bias, logit scale and soft-cap go through the gathered logits as in the full ones."""
    lenses, hs, final_h, unembed = _quirky_case(softcap)
    if softcap is not None:  # guard: the cap must bend the logits or it is not tested
        with torch.no_grad():
            raw = unembed.lm_head(unembed.norm(final_h)) * unembed.logit_scale
        assert float(raw.abs().max()) > softcap
    ref_kl, ref_grads = oracle_fp64(lenses, hs, final_h, unembed)
    got = subset_kl_loss_backward(lenses, hs, final_h, unembed, k=unembed.weight.shape[0],
                                  token_chunk=5)
    assert rel_err(got["tuned"], ref_kl["tuned"]) <= RTOL
    for p, g in zip(lenses["tuned"].parameters(), ref_grads["tuned"], strict=True):
        assert rel_err(p.grad, g) <= RTOL


@pytest.mark.parametrize("softcap,exact_cross", [(None, True), (None, False), (3.0, True)])
def test_error_shrinks_as_k_grows(softcap: float | None, exact_cross: bool) -> None:
    """Mean |estimate - exact| over seeds falls as k goes V/8 -> V/4 -> V/2 -> V (= 0),
    and at k < V the estimate is biased low (log of an unbiased Ẑ, Jensen)."""
    lenses, hs, final_h, unembed = _quirky_case(softcap, V=128)
    V = unembed.weight.shape[0]
    exact, _ = oracle_fp64(lenses, hs, final_h, unembed)
    errors, biases, seeds = [], [], 20
    for k in (V // 8, V // 4, V // 2, V):
        diffs = []
        for seed in range(seeds):
            got = subset_kl_loss_backward(lenses, hs, final_h, unembed, k=k, tail_samples=8,
                                          backward=False, exact_cross=exact_cross,
                                          generator=torch.Generator().manual_seed(seed))
            diffs.append(got["tuned"].double() - exact["tuned"])
        d = torch.stack(diffs)
        errors.append(float(d.abs().mean()))
        biases.append(float(d.mean()))
    assert errors[0] > 1e-2, errors  # the tail estimate is really inexact at small k
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-4, errors
    assert all(b < 0 for b in biases[:-1]), biases


def test_gradient_converges_with_tail_samples() -> None:
    """At k < V the estimated gradient approaches the exact one as m grows."""
    lenses, hs, final_h, unembed = _quirky_case(None, V=128)
    twin = copy.deepcopy(lenses)
    fused_kl_loss_backward(twin, hs, final_h, unembed)
    exact = twin["tuned"].weight.grad.flatten()
    cosines = []
    for m in (8, 32, 128):
        cos = 0.0
        for seed in range(4):
            ls = copy.deepcopy(lenses)
            subset_kl_loss_backward(ls, hs, final_h, unembed, k=32, tail_samples=m,
                                    generator=torch.Generator().manual_seed(seed))
            g = ls["tuned"].weight.grad.flatten()
            cos += float(torch.nn.functional.cosine_similarity(g, exact, dim=0)) / 4
        cosines.append(cos)
    assert cosines[0] < cosines[1] < cosines[2], cosines
    assert cosines[-1] > 0.95, cosines


def test_seeded_generator_is_deterministic() -> None:
    lenses, hs, final_h, unembed = _quirky_case(3.0)
    runs = []
    for seed in (0, 0, 1):
        ls = copy.deepcopy(lenses)
        kl = subset_kl_loss_backward(ls, hs, final_h, unembed, k=8, tail_samples=16,
                                     generator=torch.Generator().manual_seed(seed))
        runs.append((kl["tuned"], _grads(ls)["tuned"]))
    (kl0, g0), (kl1, g1), (kl2, g2) = runs
    assert torch.equal(kl0, kl1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert not torch.equal(kl0, kl2)  # the seed matters: the tail really is sampled


def test_scale_accumulates_no_backward_and_checks() -> None:
    lenses, hs, final_h, unembed = _quirky_case(None)
    tuned = lenses["tuned"]

    def run(**kw: object) -> dict[str, Tensor]:
        kw = {"k": 8, "tail_samples": 16, **kw}
        return subset_kl_loss_backward(lenses, hs, final_h, unembed,
                                       generator=torch.Generator().manual_seed(3), **kw)

    run(scale=0.25)
    once = tuned.weight.grad.clone()
    kls = run(scale=0.25)
    assert torch.allclose(tuned.weight.grad, 2 * once, rtol=1e-5, atol=1e-9)
    tuned.zero_grad(set_to_none=True)
    again = run(backward=False)
    assert tuned.weight.grad is None
    assert torch.allclose(again["tuned"], kls["tuned"], rtol=1e-5)
    with pytest.raises(ValueError):
        run(tail_samples=0)
    with pytest.raises(ValueError):
        run(uniform_mix=0.0)


def test_heldout_kl_close_to_exact_training(tiny_adapter) -> None:
    """Training on the subset loss gets most of exact training's held-out (exact) KL drop."""
    adapter = tiny_adapter("llama")
    gen = torch.Generator().manual_seed(5)

    def data(n: int) -> tuple[Tensor, Tensor]:
        return _hidden(adapter, torch.randint(3, adapter.vocab_size, (n, 16), generator=gen))

    train_set, test_set = data(16), data(8)
    base = TunedLens.from_model(adapter)

    def heldout(lens: TunedLens) -> float:
        kl = fused_kl_loss_backward({"t": lens}, *test_set, adapter.unembed, backward=False)
        return float(kl["t"].mean())

    def train(subset: bool) -> float:
        lens = copy.deepcopy(base).bind(adapter)
        opt = torch.optim.Adam(lens.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            opt.zero_grad()
            if subset:  # k = V/8
                subset_kl_loss_backward({"t": lens}, *train_set, adapter.unembed, k=16,
                                        tail_samples=16, generator=g)
            else:
                fused_kl_loss_backward({"t": lens}, *train_set, adapter.unembed)
            opt.step()
        return heldout(lens)

    init, exact, subset = heldout(base), train(False), train(True)
    assert exact < 0.8 * init, (init, exact)  # guard: training really moves the lens
    assert init - subset >= 0.85 * (init - exact), (init, exact, subset)


@pytest.mark.parametrize("softcap,exact_cross", [(None, False), (None, True), (3.0, False)])
def test_fused_function_matches_autograd_statement(softcap: float | None,
                                                   exact_cross: bool) -> None:
    """SubsetKL (gradient fused into forward) = subset_kl (plain autograd), at k < V."""
    _, hs, final_h, unembed = _quirky_case(softcap, V=128)
    w, b = unembed.weight.detach(), unembed.bias.detach()
    target = ChunkTarget(final_h, unembed, w, b, 16, 24, 0.5,
                         torch.Generator().manual_seed(0), Workspace(), exact_cross)
    assert target.tail_idx is not None and (target.p_w is not None) == exact_cross
    x = unembed.norm(hs).detach().requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    up = torch.rand(hs.shape[:2], generator=torch.Generator().manual_seed(1))
    fused = SubsetKL.apply(x, target, w, 0.8, softcap, True)
    plain = subset_kl(y, target, w, 0.8, softcap)
    (fused * up).sum().backward()
    (plain * up).sum().backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)


def test_accepts_every_fused_loss_argument() -> None:
    """Drop-in: every parameter of the fused loss is a parameter of the subset loss."""
    import inspect

    fused = inspect.signature(fused_kl_loss_backward).parameters
    subset = inspect.signature(subset_kl_loss_backward).parameters
    for name, param in fused.items():
        assert name in subset and subset[name].kind == param.kind, name
