"""Early-exit generation: exact when nothing exits, right KV cache when blocks are skipped."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from helpers import build_tiny_model, char_tokenizer, tiny_config

from lensforge.cli.main import main
from lensforge.early_exit import (
    FullVocabCheck,
    KVPropagator,
    ScreenedCheck,
    ShortlistCheck,
    calm_threshold,
    check_lambda,
    generate,
    should_exit,
    top2_gap,
)
from lensforge.errors import ConfigError, LensMismatchError, ShapeError, UnsupportedModelError
from lensforge.lenses import LogitLens, LowRankLens, load_lens, save_lens
from lensforge.models import ModelAdapter

pytestmark = pytest.mark.unit  # library code on tiny models and plain data

PROMPT_LEN = 7
DECODER_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def build_model(family: str) -> torch.nn.Module:
    """The tiny model of `family`; Mistral's with its sliding window off (the early-exit
    decoder needs full attention), same weights as the conftest one."""
    model = build_tiny_model(family)
    if family != "mistral":
        return model
    from transformers import AutoModelForCausalLM

    config = tiny_config("mistral")
    config.sliding_window = None
    full = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                            dtype=torch.float32)
    full.load_state_dict(model.state_dict())
    return full.eval()


@dataclass
class ExitAt:
    """Exit policy for tests: every decode step exits at residual `layer`."""

    layer: int
    patience: int = 0

    def threshold(self, step: int, layer: int) -> float:
        return float("-inf") if layer == self.layer else float("inf")


def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ rule
def test_calm_threshold_hand_values():
    assert calm_threshold(0.5, 0, 10) == pytest.approx(0.45 + 0.1)
    assert calm_threshold(1.0, 5, 10) == pytest.approx(0.9 + 0.1 * math.exp(-2.0))
    assert calm_threshold(0.0, 10**6, 10) == pytest.approx(0.0, abs=1e-12)
    assert should_exit(0.96, 1.0, 100, 10) and not should_exit(0.9, 1.0, 100, 10)
    assert not should_exit(1.0, None, 0, 10)
    with pytest.raises(ConfigError):
        calm_threshold(0.5, 0, 0)


def test_top2_gap():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.5, 0.0]])
    assert torch.allclose(top2_gap(probs), torch.tensor([0.3, 0.0]))


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), "high"])
def test_lambda_out_of_range(bad):
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        check_lambda(bad)


# ------------------------------------------------------------------ exits off = model
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_exits_off_equals_model_generate(family):
    model = build_model(family)
    adapter = ModelAdapter(model, model_id=f"tiny-{family}")
    ids = prompt(3)
    n = 16
    ref = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, PROMPT_LEN:].tolist()
    ours = generate(adapter, None, ids, n, lam=None, stop_tokens=())
    assert ours.tokens == ref
    assert ours.exit_layers == [adapter.n_layers] * n and ours.exit_rate == 0.0
    # With a lens and λ = 1 nothing can pass Δ > 0.9 + 0.1·exp(-4i/N) on this model either.
    lens = LogitLens.from_model(adapter)
    strict = generate(adapter, lens, ids, n, lam=1.0, stop_tokens=())
    assert strict.tokens == ref and strict.n_checks > 0


def test_exits_off_stops_at_eos_like_generate():
    model = build_tiny_model("qwen3")
    adapter = ModelAdapter(model, model_id="tiny-qwen3")
    ids = prompt(3)
    ref = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, PROMPT_LEN:]
    first = int(ref[3])  # pretend the 4th greedy token is EOS
    ours = generate(adapter, None, ids, 16, lam=None, stop_tokens=[first])
    assert ours.tokens == ref[: ours.tokens.index(first) + 1].tolist()


# ------------------------------------------------------------ forced exit: KV content
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_forced_exit_fills_skipped_kv_from_exit_state(family):
    from transformers import DynamicCache

    from lensforge.early_exit.families import cache_keyword

    model = build_model(family)
    adapter = ModelAdapter(model, model_id=f"tiny-{family}")
    lens = LogitLens.from_model(adapter)
    L, j, n = adapter.n_layers, 1, 6
    ids = prompt(5)
    result, cache = generate(adapter, lens, ids, n, policy=ExitAt(j), exit_layers=[j],
                             stop_tokens=(), return_cache=True)
    assert result.exit_layers == [L] + [j] * (n - 1)
    assert result.n_checks == n - 1
    total = PROMPT_LEN + n - 1  # the last token is never fed back
    attn = adapter.layers[0].self_attn
    for s in range(L):
        assert cache.layers[s].keys.shape == (1, model.config.num_key_value_heads, total,
                                              attn.head_dim)
        assert cache.layers[s].values.shape == cache.layers[s].keys.shape

    # Block 0 always runs, so h_1 of every position is the model's own (independent) h_1.
    seq = torch.cat([ids[0], torch.tensor(result.tokens[:-1])])[None]
    h1 = adapter.hidden_states(seq, layers=[j])[0]
    rotary = model.model.rotary_emb
    attn_cache_kw = cache_keyword(type(adapter.layers[0].self_attn), ())
    for p in range(PROMPT_LEN, total):
        h = h1[:, p : p + 1]
        cos, sin = rotary(h, torch.tensor([[p]]))
        for s in range(j, L):
            layer = adapter.layers[s]
            direct = DynamicCache(config=model.config)  # the attention module's own k/v path
            layer.self_attn(layer.input_layernorm(h), position_embeddings=(cos, sin),
                            attention_mask=None, **{attn_cache_kw: direct})
            torch.testing.assert_close(cache.layers[s].keys[:, :, p], direct.layers[s].keys[:, :, 0])
            torch.testing.assert_close(cache.layers[s].values[:, :, p],
                                       direct.layers[s].values[:, :, 0])
        # The exited token is the lens's top-1 at layer j.
        assert result.tokens[p - PROMPT_LEN + 1] == int(lens(h1[0, p], j).argmax())
    # Prompt positions come from the full-model prefill, untouched.
    full = model(ids, use_cache=True).past_key_values
    for s in range(L):
        torch.testing.assert_close(cache.layers[s].keys[:, :, :PROMPT_LEN], full.layers[s].keys)


def test_exit_layers_bound_the_checks():
    adapter = ModelAdapter(build_tiny_model("llama"), model_id="tiny-llama")
    lens = LogitLens.from_model(adapter)
    res = generate(adapter, lens, prompt(), 8, lam=1.0, exit_layers=[2], stop_tokens=())
    assert res.n_checks == 7 and res.settings["exit_layers"] == [2]
    res = generate(adapter, lens, prompt(), 8, lam=1.0, exit_every=2, stop_tokens=())
    assert res.settings["exit_layers"] == [2]
    res = generate(adapter, lens, prompt(), 8, lam=1.0, exit_layers=[1, 2], min_layer=2,
                   check="shortlist", stop_tokens=())
    assert res.settings["exit_layers"] == [2] and res.settings["check"] == "shortlist"
    low = generate(adapter, lens, prompt(), 8, lam=0.0, min_layer=2, stop_tokens=())
    assert all(j == 2 or j == adapter.n_layers for j in low.exit_layers)


def test_sampling_is_seeded():
    adapter = ModelAdapter(build_tiny_model("qwen3"), model_id="tiny-qwen3")
    lens = LogitLens.from_model(adapter)
    a = generate(adapter, lens, prompt(), 10, lam=0.2, do_sample=True, seed=7, stop_tokens=())
    b = generate(adapter, lens, prompt(), 10, lam=0.2, do_sample=True, seed=7, stop_tokens=())
    assert a.tokens == b.tokens and a.exit_layers == b.exit_layers
    greedy = generate(adapter, lens, prompt(), 10, lam=0.2, do_sample=True, top_k=1,
                      stop_tokens=())
    assert greedy.tokens == generate(adapter, lens, prompt(), 10, lam=0.2, stop_tokens=()).tokens


# ---------------------------------------------------------------------- screened check
def test_screened_check_only_misses_exits_whose_top1_is_outside_the_shortlist():
    adapter = ModelAdapter(build_tiny_model("llama"), model_id="tiny-llama")
    lens = LowRankLens.from_model(adapter, rank=4)
    with torch.no_grad():
        lens.up.normal_(0, 0.5)
    full = FullVocabCheck(lens)
    screened = ScreenedCheck(lens, static=16, per_step=0, capacity=64)
    screened.reset([20, 30])
    in_shortlist = set(range(16)) | {20, 30}
    assert screened.size == len(in_shortlist)
    gen = torch.Generator().manual_seed(0)
    seen = {"exit": 0, "skipped": 0}
    for _ in range(200):
        h = torch.randn(adapter.hidden_size, generator=gen) * 3
        for threshold in (0.0, 0.02, 0.1, 0.3):
            f, s = full(h, 2, threshold), screened(h, 2, threshold)
            if s.exit:  # confirmed by a full check: same decision, same logits
                assert f.exit and s.full and torch.equal(s.logits, f.logits)
                seen["exit"] += 1
            elif f.exit:  # a missed exit is only allowed when the top-1 is not screened
                assert int(f.logits.argmax()) not in in_shortlist
            if not s.full:
                seen["skipped"] += 1
    assert seen["exit"] > 0 and seen["skipped"] > 0  # both branches exercised


def test_screened_generation_equals_full_when_the_shortlist_is_the_vocabulary():
    adapter = ModelAdapter(build_tiny_model("qwen3"), model_id="tiny-qwen3")
    lens = LogitLens.from_model(adapter)
    kw = dict(lam=0.1, stop_tokens=())
    full = generate(adapter, lens, prompt(), 12, check="full", **kw)
    scr = generate(adapter, lens, prompt(), 12, check="screened", screen_static=128, **kw)
    assert scr.tokens == full.tokens and scr.exit_layers == full.exit_layers
    assert scr.n_checks == full.n_checks and scr.n_full_checks <= full.n_full_checks
    assert full.n_full_checks == full.n_checks
    with pytest.raises(ConfigError):
        ScreenedCheck(lens, static=1)


def test_shortlist_check_decides_from_the_shortlist_alone():
    adapter = ModelAdapter(build_tiny_model("llama"), model_id="tiny-llama")
    lens = LowRankLens.from_model(adapter, rank=4)
    with torch.no_grad():
        lens.up.normal_(0, 0.5)
    screened = ScreenedCheck(lens, static=16, per_step=0, capacity=64)
    short = ShortlistCheck(lens, static=16, per_step=0, capacity=64)
    for c in (screened, short):
        c.reset([20, 30])
    shortlist = sorted(set(range(16)) | {20, 30})
    gen = torch.Generator().manual_seed(1)
    exits = 0
    for _ in range(100):
        h = torch.randn(adapter.hidden_size, generator=gen) * 3
        with torch.no_grad():
            z = lens(h, 2).float()[shortlist]
        gap = float(top2_gap(torch.softmax(z, -1)))
        for threshold in (0.0, 0.1, 0.3):
            r = short(h, 2, threshold)
            assert r.exit == (gap > threshold) and not r.full
            if r.exit:  # the token is the shortlist's top-1; nothing outside S can be picked
                exits += 1
                assert int(r.logits.argmax()) == shortlist[int(z.argmax())]
                outside = torch.ones(r.logits.shape[0], dtype=torch.bool)
                outside[shortlist] = False
                assert torch.isinf(r.logits[outside]).all()
                # the screen passes exactly where the shortlist check exits
                assert screened._screen(h, 2)[1] == pytest.approx(r.confidence)
                assert r.top1 == int(r.logits.argmax())
    assert exits > 0


def test_shortlist_generation_equals_full_when_the_shortlist_is_the_vocabulary():
    adapter = ModelAdapter(build_tiny_model("qwen3"), model_id="tiny-qwen3")
    lens = LogitLens.from_model(adapter)
    kw = dict(lam=0.0, stop_tokens=())
    full = generate(adapter, lens, prompt(), 12, check="full", **kw)
    short = generate(adapter, lens, prompt(), 12, check="shortlist", screen_static=128, **kw)
    assert short.tokens == full.tokens and short.exit_layers == full.exit_layers
    assert short.n_full_checks == 0 and short.exit_rate > 0
    # Nothing exits at λ = 1 on this model, whichever check: the model's own decoding.
    ref = generate(adapter, None, prompt(), 12, lam=None, stop_tokens=())
    strict = generate(adapter, lens, prompt(), 12, lam=1.0, check="shortlist",
                      screen_static=128, stop_tokens=())
    assert strict.tokens == ref.tokens and strict.exit_rate == 0.0


def test_patience_requires_a_stable_top1():
    adapter = ModelAdapter(build_tiny_model("qwen3"), model_id="tiny-qwen3")
    lens = LogitLens.from_model(adapter)
    L = adapter.n_layers
    kw = dict(lam=0.0, exit_layers=[1, 2], stop_tokens=(), check="shortlist", screen_static=128)
    plain = generate(adapter, lens, prompt(), 12, **kw)
    assert 1 in plain.exit_layers  # the plain rule exits at the first check
    once = generate(adapter, lens, prompt(), 12, patience=1, **kw)
    assert set(once.exit_layers[1:]) <= {2, L}  # a streak needs two checks
    for tok, j in zip(once.tokens[1:], once.exit_layers[1:], strict=True):
        if j == 2:  # layer-1 and layer-2 lenses agreed on the token
            assert once.settings["patience"] == 1 and tok >= 0
    # more patience than checks: nothing exits, the model's own decoding
    never = generate(adapter, lens, prompt(), 12, patience=2, **kw)
    ref = generate(adapter, None, prompt(), 12, lam=None, stop_tokens=())
    assert never.tokens == ref.tokens and never.exit_rate == 0.0
    with pytest.raises(ConfigError, match="patience"):
        generate(adapter, lens, prompt(), 4, lam=0.5, patience=-1)


def test_calibrated_thresholds(tmp_path):
    from lensforge.early_exit.calibrate import (
        collect,
        fit_thresholds,
        load_thresholds,
        save_thresholds,
        simulate,
    )

    adapter = ModelAdapter(build_tiny_model("llama"), model_id="tiny-llama")
    lens = LogitLens.from_model(adapter)
    L = adapter.n_layers
    refs = []
    for seed in range(6):
        ids = prompt(seed)
        out = generate(adapter, None, ids, 12, lam=None, stop_tokens=())
        refs.append((ids[0].tolist(), out.tokens))
    data = collect(adapter, lens, refs, [1, 2], static=128)
    assert data.conf["full"].shape == (6 * 11, 2) and data.target.shape == (6 * 11,)
    # the full model's top-1 along its own greedy output is the next token
    assert data.target.tolist() == [t for _, toks in refs for t in toks[1:]]
    for target in (0.5, 0.9):
        th = fit_thresholds(data, target, mode="full", min_exits=1)
        fit = simulate(data, th, mode="full")
        assert fit["agreement"] >= target - 1e-9
        for j, t in th.items():  # exits at layer j, on their own, meet the target
            assert j in (1, 2) and t >= 0.0
    # round trip, and the decoder only checks the calibrated layers
    save_thresholds(tmp_path / "t.json", {2: 0.25}, target=0.9)
    th = load_thresholds(tmp_path / "t.json")
    assert th == {2: 0.25}
    res = generate(adapter, lens, prompt(), 8, lam=0.0, layer_thresholds=th, stop_tokens=())
    assert res.settings["exit_layers"] == [2] and set(res.exit_layers) <= {2, L}
    # a threshold no confidence can pass: nothing exits, the model's own decoding
    never = generate(adapter, lens, prompt(), 8, lam=0.0, layer_thresholds={1: 1.0, 2: 1.0},
                     stop_tokens=())
    ref = generate(adapter, None, prompt(), 8, lam=None, stop_tokens=())
    assert never.tokens == ref.tokens and never.exit_rate == 0.0
    with pytest.raises(ConfigError, match="outside"):
        generate(adapter, lens, prompt(), 4, lam=0.5, layer_thresholds={5: 0.5})
    with pytest.raises(ConfigError, match="thresholds"):
        load_thresholds(tmp_path / "missing.json")


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_fused_kv_propagation_equals_per_block(family):
    from transformers import DynamicCache

    from lensforge.early_exit import propagated_kv

    model = build_model(family)
    adapter = ModelAdapter(model, model_id=f"tiny-{family}")
    L = adapter.n_layers
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(1, 1, adapter.hidden_size, generator=gen)
    cos, sin = model.model.rotary_emb(h, torch.tensor([[9]]))
    for first, start in ((1, 1), (1, 2), (2, 1)):  # (2, 1): below the fused range, per block
        prop = KVPropagator(adapter.layers, first)
        assert prop.fused
        cache = DynamicCache(config=model.config)
        prop(cache, h, start, cos, sin)
        for s in range(start, L):
            k, v = propagated_kv(adapter.layers[s], h, cos, sin)
            torch.testing.assert_close(cache.layers[s].keys, k)
            torch.testing.assert_close(cache.layers[s].values, v)


# ------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors(tmp_path):
    adapter = ModelAdapter(build_tiny_model("llama"), model_id="tiny-llama")
    lens = LogitLens.from_model(adapter)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        generate(adapter, lens, prompt(), 4, lam=1.5)
    with pytest.raises(ConfigError, match="needs a lens"):
        generate(adapter, None, prompt(), 4, lam=0.5)
    with pytest.raises(ConfigError, match="1..2"):
        generate(adapter, lens, prompt(), 4, lam=0.5, exit_layers=[3])
    with pytest.raises(ShapeError):
        generate(adapter, lens, torch.tensor([[500]]), 4, lam=0.5)
    with pytest.raises(ShapeError):
        generate(adapter, lens, torch.tensor([], dtype=torch.long), 4, lam=0.5)
    # A lens saved for another model is refused at load time.
    other = ModelAdapter(build_tiny_model("llama", seed=9), model_id="tiny-llama-9")
    save_lens(LowRankLens.from_model(other, rank=4), tmp_path / "other")
    with pytest.raises(LensMismatchError):
        load_lens(tmp_path / "other", adapter)
    # A lens of another width is refused by generate itself.
    qwen3 = ModelAdapter(build_tiny_model("qwen3"), model_id="tiny-qwen3")
    wide = LogitLens.from_model(qwen3)
    wide.config.hidden_size = 64
    with pytest.raises(LensMismatchError):
        generate(qwen3, wide, prompt(), 4, lam=0.5)


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "mistral"])
def test_unsupported_families_say_what_is_supported(family):
    adapter = ModelAdapter(build_tiny_model(family), model_id=f"tiny-{family}")
    with pytest.raises(UnsupportedModelError, match="supported: llama"):
        generate(adapter, None, prompt(), 4, lam=None)


# ------------------------------------------------------------------------------ CLI
@pytest.mark.integration
def test_cli_generate(tmp_path, capsys):
    import json

    folder = tmp_path / "tiny"
    build_tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    common = ["--model", str(folder), "--dtype", "float32", "--max-new-tokens", "6"]
    rc = main(["generate", "Hello", "--lens", "logit", "--lambda", "0.3", "--json", *common])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["new_tokens"] <= 6 and 0.0 <= stats["exit_rate"] <= 1.0
    assert stats["settings"]["lambda"] == 0.3
    rc = main(["generate", "Hello", "--lens", "logit", "--lambda", "0.3", "--json", "--check",
               "shortlist", "--exit-layers", "2", *common])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["settings"]["exit_layers"] == [2] and stats["settings"]["check"] == "shortlist"
    assert main(["generate", "Hello", "--lambda", "off", *common]) == 0
    assert "exit rate 0.0%" in capsys.readouterr().out
    assert main(["generate", "Hello", "--lens", "logit", "--lambda", "1.5", *common]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert main(["generate", "Hello", "--lambda", "0.5", *common]) == 2
    assert "--lens is required" in capsys.readouterr().err
