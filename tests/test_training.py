"""Training: closed-form init against a direct solve, loss against metrics, end-to-end."""

from __future__ import annotations

import pytest
import torch

from lensforge.errors import ConfigError, DataExhaustedError, NonFiniteError
from lensforge.lenses import LogitLens, LowRankLens, TunedLens
from lensforge.metrics import kl_divergence
from lensforge.training import TrainConfig, train
from lensforge.training.closed_form import MomentAccumulator, closed_form_init
from lensforge.training.loop import lr_factor
from lensforge.training.loss import kl_loss_backward

pytestmark = pytest.mark.unit  # library code on tiny models and plain data


def _states(adapter, seed=0, n=4, t=24):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, adapter.vocab_size, (n, t), generator=gen)
    hs = adapter.hidden_states(ids)
    L = adapter.n_layers
    return hs[:L].flatten(1, 2), hs[L].flatten(0, 1)


def test_closed_form_matches_direct_ridge_solve(tiny_adapter):
    adapter = tiny_adapter("llama")
    layer_h, final_h = _states(adapter)
    moments = MomentAccumulator(adapter.n_layers, adapter.hidden_size)
    # stream in two parts: the sums must equal one big pass
    moments.update(layer_h[:, :40], final_h[:40])
    moments.update(layer_h[:, 40:], final_h[40:])
    lens = TunedLens.from_model(adapter)
    ridge = 1e-3
    closed_form_init([lens], moments, ridge=ridge)
    for layer in range(adapter.n_layers):
        x = layer_h[layer].double()
        y = final_h.double() - x
        xc, yc = x - x.mean(0), y - y.mean(0)
        cxx = xc.T @ xc / len(x)
        lam = ridge * cxx.diagonal().mean()
        w = torch.linalg.solve(cxx + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc / len(x))
        b = y.mean(0) - x.mean(0) @ w
        torch.testing.assert_close(lens.weight[layer].double(), w.T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lens.bias[layer].double(), b, rtol=1e-4, atol=1e-5)


def test_reduced_rank_is_rank_r_and_beats_truncated_svd(tiny_adapter):
    adapter = tiny_adapter("qwen2")
    layer_h, final_h = _states(adapter, n=6)
    moments = MomentAccumulator(adapter.n_layers, adapter.hidden_size)
    moments.update(layer_h, final_h)
    full, low = TunedLens.from_model(adapter), LowRankLens.from_model(adapter, rank=3)
    closed_form_init([full, low], moments, ridge=1e-3)
    for layer in range(adapter.n_layers):
        x = layer_h[layer].double()
        y = final_h.double() - x
        m = low.translator_matrix(layer).double()
        sv = torch.linalg.svdvals(m)
        assert sv[3:].max() < 1e-5 * sv[0]  # rank 3 up to fp32 rounding
        pred_rrr = x @ m.T + low.bias[layer].double()
        # rival: truncate the full ridge map's SVD to rank 3 (refit its intercept)
        u, s, vh = torch.linalg.svd(full.weight[layer].double())
        trunc = (u[:, :3] * s[:3]) @ vh[:3]
        b = (y - x @ trunc.T).mean(0)
        pred_svd = x @ trunc.T + b
        assert ((y - pred_rrr) ** 2).sum() <= ((y - pred_svd) ** 2).sum() * (1 + 1e-6)


def test_loss_equals_metric_kl_and_has_gradients(tiny_adapter):
    adapter = tiny_adapter("gemma2")  # exercises the soft-cap quirk
    layer_h, final_h = _states(adapter)
    lens = LowRankLens.from_model(adapter, rank=4)
    with torch.no_grad():
        lens.up.normal_(0, 0.1)
    kls = kl_loss_backward({"l": lens}, layer_h, final_h, adapter.unembed, token_chunk=7)["l"]
    target = torch.log_softmax(adapter.unembed(final_h), -1)
    for layer in range(adapter.n_layers):
        q = torch.log_softmax(lens(layer_h[layer], layer), -1)
        expected = kl_divergence(target, q).mean()
        assert abs(float(kls[layer]) - float(expected)) < 1e-5
    assert lens.up.grad is not None and lens.up.grad.abs().sum() > 0
    # gradient equals autograd of the plain mean-over-tokens, sum-over-layers objective
    grad = lens.up.grad.clone()
    lens.zero_grad()
    total = sum(
        kl_divergence(target, torch.log_softmax(lens(layer_h[i], i), -1)).mean()
        for i in range(adapter.n_layers)
    )
    total.backward()
    torch.testing.assert_close(grad, lens.up.grad, rtol=1e-4, atol=1e-6)


def test_nan_hidden_states_raise(tiny_adapter):
    adapter = tiny_adapter("llama")
    with torch.no_grad():
        adapter.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError):
        _states(adapter)


def test_lr_schedule_warmup_then_linear_decay():
    cfg = TrainConfig(tokens=10 * 8192, tokens_per_step=8192, batch_size=4, seq_len=512,
                      warmup_steps=2)
    factors = [lr_factor(s, cfg) for s in range(cfg.total_steps)]
    assert factors[0] < factors[1] < factors[2] == 1.0
    assert all(a > b for a, b in zip(factors[2:], factors[3:], strict=False))


@pytest.mark.parametrize(
    "kwargs",
    [dict(optimizer="lbfgs"), dict(init="random"), dict(tokens_per_step=10), dict(tokens=-1),
     dict(lens_types=["logit"])],
)
def test_bad_config_rejected(kwargs):
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs).validate()


def _cfg(tmp_path, corpus, **kw):
    base = dict(model="tiny", data=str(corpus), lens_types=["tuned", "lowrank"], rank=4,
                init_tokens=64, tokens=256, tokens_per_step=64, batch_size=2, seq_len=16,
                lr=1e-2, seed=0, checkpoint_every=2, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def tiny_with_tokenizer(tmp_path):
    from tiny_folder import make_tiny_model_dir, write_corpus

    from lensforge.models import load_model

    folder = make_tiny_model_dir(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus.txt")
    return load_model(str(folder), dtype="float32"), corpus


def test_train_end_to_end_reduces_kl(tiny_with_tokenizer, tmp_path):
    adapter, corpus = tiny_with_tokenizer
    result = train(_cfg(tmp_path, corpus, init="zero", tokens=512), adapter, progress=False)
    first, last = result.history[0]["kl_mean"], result.history[-1]["kl_mean"]
    assert set(result.lenses) == {"tuned", "lora_r4"}
    for name in result.lenses:
        assert last[name] < first[name]
    assert (tmp_path / "run" / "lenses" / "lora_r4" / "lens.safetensors").exists()


def test_closed_form_beats_logit_lens(tiny_with_tokenizer, tmp_path):
    from lensforge.data import PackedTokenStream, iter_documents
    from lensforge.evaluation import evaluate

    adapter, corpus = tiny_with_tokenizer
    result = train(_cfg(tmp_path, corpus, init_tokens=512, tokens=0, init="closed-form"),
                   adapter, progress=False)
    stream = PackedTokenStream(lambda: iter_documents(corpus), adapter.tokenizer, 16)
    res = evaluate(adapter, {"logit": LogitLens.from_model(adapter), **result.lenses},
                   stream.batches(2), max_tokens=256)
    assert res["tuned"]["mean"]["kl"] < res["logit"]["mean"]["kl"]


def test_running_out_of_data_is_an_error(tiny_with_tokenizer, tmp_path):
    adapter, corpus = tiny_with_tokenizer
    with pytest.raises(DataExhaustedError, match="ran out"):
        train(_cfg(tmp_path, corpus, tokens=10**7), adapter, progress=False)


def test_existing_checkpoint_needs_resume(tiny_with_tokenizer, tmp_path):
    from lensforge.errors import CheckpointError

    adapter, corpus = tiny_with_tokenizer
    train(_cfg(tmp_path, corpus, tokens=128), adapter, progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        train(_cfg(tmp_path, corpus, tokens=128), adapter, progress=False)
    with pytest.raises(ConfigError, match="changed"):
        train(_cfg(tmp_path, corpus, tokens=128, lr=0.5), adapter, resume=True, progress=False)


def test_budget_below_one_step_is_an_error(tiny_with_tokenizer, tmp_path) -> None:
    """--tokens smaller than one optimizer step used to train zero steps silently."""
    adapter, corpus = tiny_with_tokenizer
    with pytest.raises(ConfigError, match="less than one optimizer step"):
        train(_cfg(tmp_path, corpus, tokens=32, tokens_per_step=64), adapter, progress=False)
    assert not (tmp_path / "run" / "lenses").exists()
