"""The fused KL path against an fp64 oracle and the reference `kl_loss_backward`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from lensforge.lenses import LogitLens, LowRankLens, TunedLens
from lensforge.models import ModelAdapter
from lensforge.training.fast_loss import UnembedKL, fused_kl_loss_backward, target_stats
from lensforge.training.loss import kl_loss_backward

pytestmark = pytest.mark.unit  # library code on tiny models and plain data

# llama: tied head; gemma2: soft-cap + (1+w) norm; phi / llama_head_bias: biased heads;
# gpt2: LayerNorm with bias; qwen3: another RMSNorm family.
FAMILIES = ("llama", "gemma2", "phi", "llama_head_bias", "gpt2", "qwen3")
RTOL = 1e-3


def _lenses(adapter: ModelAdapter, seed: int = 0) -> dict:
    """A tuned and a LoRA lens with non-trivial (random) parameters."""
    gen = torch.Generator().manual_seed(seed)
    tuned = TunedLens.from_model(adapter)
    lora = LowRankLens.from_model(adapter, rank=4, seed=seed)
    with torch.no_grad():
        for lens in (tuned, lora):
            for p in lens.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return {"tuned": tuned, "lora": lora}


def _hidden(adapter: ModelAdapter, ids: Tensor) -> tuple[Tensor, Tensor]:
    hs = adapter.hidden_states(ids)
    L = adapter.n_layers
    return hs[:L].flatten(1, 2), hs[L].flatten(0, 1)


def oracle_fp64(lenses: dict, hs: Tensor, final_h: Tensor, unembed: torch.nn.Module
                ) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
    """Straightforward fp64 loss and gradients: full logits per layer, autograd throughout."""
    un = copy.deepcopy(unembed).double()
    target = torch.log_softmax(un(final_h.double()), -1)
    kls, grads = {}, {}
    for name, lens in lenses.items():
        lens64 = copy.deepcopy(lens).double()
        per_layer = []
        for layer in range(hs.shape[0]):
            logq = torch.log_softmax(un(lens64.transform_hidden(hs[layer].double(), layer)), -1)
            per_layer.append((target.exp() * (target - logq)).sum(-1).mean())
        loss = torch.stack(per_layer)
        if any(p.requires_grad for p in lens64.parameters()):
            loss.sum().backward()
        kls[name] = loss.detach()
        grads[name] = [p.grad for p in lens64.parameters()]
    return kls, grads


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_matches_fp64_oracle(family: str, tiny_adapter, tiny_input_ids: Tensor) -> None:
    adapter = tiny_adapter(family)
    hs, final_h = _hidden(adapter, tiny_input_ids)
    lenses = _lenses(adapter)
    ref_kl, ref_grads = oracle_fp64(lenses, hs, final_h, adapter.unembed)
    # Small chunks and blocks so token chunking and row blocking are both exercised.
    kls = fused_kl_loss_backward(lenses, hs, final_h, adapter.unembed, token_chunk=5,
                                 block_bytes=5 * adapter.vocab_size * 4 * 2)
    for name, lens in lenses.items():
        assert rel_err(kls[name], ref_kl[name]) <= RTOL, (name, kls[name], ref_kl[name])
        for p, g in zip(lens.parameters(), ref_grads[name], strict=True):
            assert rel_err(p.grad, g) <= RTOL, (family, name, rel_err(p.grad, g))


def test_softcap_is_exercised(tiny_adapter, tiny_input_ids: Tensor) -> None:
    """Guard: the gemma2 fixture's soft-cap must bend the logits, else the test above
    would not check the soft-cap gradient at all."""
    adapter = tiny_adapter("gemma2")
    assert adapter.unembed.softcap is not None
    _, final_h = _hidden(adapter, tiny_input_ids)
    raw = adapter.unembed.lm_head(adapter.unembed.norm(final_h))
    assert float(raw.abs().max()) > adapter.unembed.softcap


@pytest.mark.parametrize("family", ("llama", "gemma2"))
def test_fused_matches_reference_path(family: str, tiny_adapter, tiny_input_ids: Tensor) -> None:
    adapter = tiny_adapter(family)
    hs, final_h = _hidden(adapter, tiny_input_ids)
    lenses = _lenses(adapter)
    twins = {n: copy.deepcopy(lens).bind(adapter) for n, lens in lenses.items()}
    ref = kl_loss_backward(twins, hs, final_h, adapter.unembed, scale=0.5, token_chunk=7)
    got = fused_kl_loss_backward(lenses, hs, final_h, adapter.unembed, scale=0.5)
    for name in lenses:
        assert rel_err(got[name], ref[name]) <= RTOL
        for p, q in zip(lenses[name].parameters(), twins[name].parameters(), strict=True):
            assert rel_err(p.grad, q.grad) <= RTOL


def test_bf16_model_error_is_small(tiny_adapter, tiny_input_ids: Tensor) -> None:
    """A bf16 model (norm in bf16, bf16 matmuls forced) stays close to the fp64 oracle."""
    adapter = tiny_adapter("llama")
    hs, final_h = _hidden(adapter, tiny_input_ids)
    lenses = _lenses(adapter)
    ref_kl, ref_grads = oracle_fp64(lenses, hs, final_h, adapter.unembed)
    adapter.model.to(torch.bfloat16)
    kls = fused_kl_loss_backward(lenses, hs.bfloat16(), final_h.bfloat16(), adapter.unembed,
                                 compute_dtype=torch.bfloat16)
    for name, lens in lenses.items():
        # bf16 has 8 mantissa bits; the hidden states themselves are rounded here.
        assert rel_err(kls[name], ref_kl[name]) <= 3e-2
        for p, g in zip(lens.parameters(), ref_grads[name], strict=True):
            assert rel_err(p.grad, g) <= 6e-2


def test_scale_accumulates_and_no_backward(tiny_adapter, tiny_input_ids: Tensor) -> None:
    adapter = tiny_adapter("llama")
    hs, final_h = _hidden(adapter, tiny_input_ids)
    lenses = _lenses(adapter)
    tuned = lenses["tuned"]
    fused_kl_loss_backward(lenses, hs, final_h, adapter.unembed, scale=0.25)
    once = tuned.weight.grad.clone()
    kls = fused_kl_loss_backward(lenses, hs, final_h, adapter.unembed, scale=0.25)
    assert torch.allclose(tuned.weight.grad, 2 * once, rtol=1e-5, atol=1e-9)
    tuned.zero_grad(set_to_none=True)
    again = fused_kl_loss_backward(lenses, hs, final_h, adapter.unembed, backward=False)
    assert tuned.weight.grad is None
    assert torch.allclose(again["tuned"], kls["tuned"], rtol=1e-5)


def test_logit_lens_and_identity_target(tiny_adapter, tiny_input_ids: Tensor) -> None:
    """A parameter-free lens works, and KL of the final state against itself is ~0."""
    adapter = tiny_adapter("gemma2")
    hs, final_h = _hidden(adapter, tiny_input_ids)
    logit = LogitLens.from_model(adapter)
    kls = fused_kl_loss_backward({"logit": logit}, hs, final_h, adapter.unembed)
    ref, _ = oracle_fp64({"logit": logit}, hs, final_h, adapter.unembed)
    assert rel_err(kls["logit"], ref["logit"]) <= RTOL
    same = fused_kl_loss_backward({"logit": logit}, final_h.expand(3, -1, -1), final_h,
                                  adapter.unembed)
    assert float(same["logit"].abs().max()) < 1e-5


@pytest.mark.parametrize("softcap", (None, 1.5))
def test_unembed_kl_gradcheck(softcap: float | None) -> None:
    """The fused gradient of UnembedKL itself, against finite differences in fp64."""
    gen = torch.Generator().manual_seed(0)
    R, C, H, V = 3, 4, 5, 11
    x = torch.randn(R, C, H, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=gen)
    b = torch.randn(V, dtype=torch.float64, generator=gen)
    unembed = torch.nn.Module()
    unembed.norm = torch.nn.Identity()
    unembed.weight, unembed.logit_scale, unembed.softcap = w, 0.7, softcap
    p, negent, p_w = target_stats(torch.randn(C, H, dtype=torch.float64, generator=gen),
                                  unembed, w, b)

    def f(x_: Tensor) -> Tensor:
        return UnembedKL.apply(x_, w, b, p, negent, p_w, 0.7, softcap, 2, True)

    # The forward pass works in fp32 internally (logits), so compare loosely.
    assert torch.autograd.gradcheck(f, (x,), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_train_fused_and_reference_agree(tmp_path) -> None:
    """`train()` gives the same lenses and losses with either loss path."""
    from tiny_folder import make_tiny_model_dir, write_corpus

    from lensforge.models import load_model
    from lensforge.training import TrainConfig, train

    adapter = load_model(str(make_tiny_model_dir(tmp_path / "model")), dtype="float32")
    corpus = write_corpus(tmp_path / "corpus.txt")
    results = {}
    for loss in ("fused", "reference"):
        cfg = TrainConfig(model="tiny", data=str(corpus), lens_types=["tuned", "lowrank"],
                          rank=4, init_tokens=64, tokens=128, tokens_per_step=64, batch_size=2,
                          seq_len=16, lr=1e-2, out=str(tmp_path / loss), loss=loss)
        results[loss] = train(cfg, adapter, progress=False)
    fused, ref = results["fused"], results["reference"]
    for step_f, step_r in zip(fused.history, ref.history, strict=True):
        for name, kl in step_r["kl_mean"].items():
            assert abs(step_f["kl_mean"][name] - kl) <= RTOL * abs(kl)
    for name, lens in ref.lenses.items():
        for p, q in zip(fused.lenses[name].parameters(), lens.parameters(), strict=True):
            assert rel_err(p.detach(), q.detach()) <= RTOL


@pytest.mark.parametrize("family", ("gemma2", "phi"))
def test_lens_logits_by_layer_matches_per_layer_unembed(family: str, tiny_adapter,
                                                        tiny_input_ids: Tensor) -> None:
    from lensforge.training.fast_loss import lens_logits_by_layer

    adapter = tiny_adapter(family)
    hs, _ = _hidden(adapter, tiny_input_ids)
    lens = _lenses(adapter)["lora"]
    seen = []
    with torch.no_grad():
        for layer, logits in lens_logits_by_layer(lens, hs, adapter.unembed,
                                                  block_bytes=hs.shape[1] * 128 * 4 * 2):
            want = lens(hs[layer], layer)
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
            seen.append(layer)
    assert seen == list(range(adapter.n_layers))


def test_workspace_is_reused_and_exact(tiny_adapter, tiny_input_ids: Tensor) -> None:
    """The reused logits/target buffers give the same loss and gradients as fresh ones,
    across calls whose chunk shapes differ (the buffer is sliced, never stale)."""
    from lensforge.training.fast_loss import Workspace

    adapter = tiny_adapter("llama")
    hs, final_h = _hidden(adapter, tiny_input_ids)
    block = 5 * adapter.vocab_size * 4 * 2
    ws = Workspace()
    for n_tokens in (hs.shape[1], 3, hs.shape[1] - 1):  # shrink, then grow again
        h, f = hs[:, :n_tokens], final_h[:n_tokens]
        lenses, twins = _lenses(adapter), _lenses(adapter)
        got = fused_kl_loss_backward(lenses, h, f, adapter.unembed, token_chunk=5,
                                     block_bytes=block, workspace=ws)
        ptrs = {role: buf.data_ptr() for role, buf in ws._bufs.items()}
        ref = fused_kl_loss_backward(twins, h, f, adapter.unembed, token_chunk=5,
                                     block_bytes=block, workspace=Workspace())
        for name in lenses:
            assert torch.equal(got[name], ref[name])
            for p, q in zip(lenses[name].parameters(), twins[name].parameters(), strict=True):
                assert torch.equal(p.grad, q.grad)
    assert set(ptrs) == {"z", "p"}
    again = fused_kl_loss_backward(_lenses(adapter), hs, final_h, adapter.unembed,
                                   token_chunk=5, block_bytes=block, workspace=ws)
    assert {role: buf.data_ptr() for role, buf in ws._bufs.items()} == ptrs  # no new buffers
    assert all(torch.isfinite(v).all() for v in again.values())
