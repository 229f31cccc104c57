"""Perplexity, KL divergence and quality gates checked against direct computations on tiny models."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from neural_quantization.evaluation import (
    LanguageResult,
    QualityGates,
    ReferenceStats,
    all_passed,
    compare_pass,
    evaluate_gates,
    evaluate_languages,
    evaluate_languages_from_loaders,
    language_eval,
    make_windows,
    perplexity,
    reference_pass,
    summarize,
)

VOCAB = 64
TEXT_EN = " ".join(["the cat sat on the mat and the dog sat on the rug"] * 6)
TEXT_FR = " ".join(["le chat dort sur le tapis et le chien mange dans la cuisine"] * 6)


def tiny_llama(seed: int = 0, sharpen: float = 1.0) -> LlamaForCausalLM:
    """A 2-layer Llama with a 64-token vocabulary; ``sharpen`` scales lm_head for peaked distributions."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def perturbed(model: LlamaForCausalLM, scale: float = 0.3, seed: int = 1) -> LlamaForCausalLM:
    """A copy with relative Gaussian noise on every linear weight (a stand-in for quantization error)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in other.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                w.add_(torch.randn(w.shape, generator=gen) * w.std() * scale)
    return other


@pytest.fixture(scope="module")
def models():
    ref = tiny_llama(sharpen=30.0)
    return ref, perturbed(ref)


@pytest.fixture(scope="module")
def windows():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (5, 24), generator=gen)


def direct_logprobs(model, windows):
    """(n, T-1, V) fp32 log-probs of every next token, one window per forward, no chunking."""
    with torch.no_grad():
        return torch.stack([F.log_softmax(model(w[None]).logits[0, :-1].float(), -1) for w in windows])


# ---------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------


def test_make_windows_without_bos_are_plain_slices(tiny_tokenizer):
    stream = tiny_tokenizer(TEXT_EN, add_special_tokens=False)["input_ids"]
    w = make_windows(tiny_tokenizer, TEXT_EN, seq_len=10)
    assert w.dtype == torch.long and w.shape == (len(stream) // 10, 10)
    assert w.flatten().tolist() == stream[: w.numel()]  # stride = seq_len, ragged tail dropped


def test_make_windows_with_bos_start_every_window_with_bos():
    tok = make_tiny_tokenizer(add_bos=True)
    stream = tok(TEXT_EN, add_special_tokens=False)["input_ids"]
    w = make_windows(tok, TEXT_EN, seq_len=10)
    assert w.shape == (len(stream) // 9, 10)
    assert (w[:, 0] == tok.bos_token_id).all()
    assert w[:, 1:].flatten().tolist() == stream[: w.shape[0] * 9]  # no text token skipped or repeated


def test_make_windows_max_windows_and_lists(tiny_tokenizer):
    full = make_windows(tiny_tokenizer, TEXT_EN, seq_len=8)
    capped = make_windows(tiny_tokenizer, TEXT_EN, seq_len=8, max_windows=2)
    assert torch.equal(capped, full[:2])
    joined = make_windows(tiny_tokenizer, [TEXT_EN, TEXT_FR], seq_len=8)
    assert joined.shape[0] > full.shape[0]


def test_make_windows_too_short_text_says_how_to_fix(tiny_tokenizer):
    with pytest.raises(ValueError, match="--eval-seq-len"):
        make_windows(tiny_tokenizer, "the cat sat", seq_len=512)
    with pytest.raises(ValueError, match="at least 2"):
        make_windows(tiny_tokenizer, TEXT_EN, seq_len=1)


def test_missing_or_short_language_is_named(tiny_tokenizer, models):
    ref, q = models
    with pytest.raises(ValueError, match="'fr'.*--eval-seq-len"):
        evaluate_languages(ref, q, tiny_tokenizer, {"en": TEXT_EN, "fr": "le chat"}, seq_len=16)
    with pytest.raises(ValueError, match="'de' has no evaluation text"):
        evaluate_languages(ref, q, tiny_tokenizer, {"en": TEXT_EN, "de": ""}, seq_len=16)


# ---------------------------------------------------------------------------------------------------
# Perplexity and KL against direct computation
# ---------------------------------------------------------------------------------------------------


def test_perplexity_matches_cross_entropy_loop(models, windows, monkeypatch):
    ref, _ = models
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = ref(w[None]).logits[0]
            nll += F.cross_entropy(logits[:-1].float(), w[1:], reduction="sum").item()
            count += len(w) - 1
    expected = math.exp(nll / count)
    assert perplexity(ref, windows, batch_size=2) == pytest.approx(expected, rel=1e-5)
    # Chunking the log-softmax over positions (tiny budget: 3 positions per chunk) changes nothing.
    monkeypatch.setattr(language_eval, "_LOGSOFTMAX_BUDGET", 3 * 2 * VOCAB)
    assert perplexity(ref, windows, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_exact_kl_matches_full_vocab_kl(models, windows):
    ref, q = models
    lp, lq = direct_logprobs(ref, windows), direct_logprobs(q, windows)
    full_kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    stats = reference_pass(ref, windows, top_k=None, batch_size=3)
    result = compare_pass(q, windows, stats, batch_size=2)
    assert not result.kl_is_topk_approximation
    assert result.kl_divergence == pytest.approx(full_kl, rel=1e-4)
    targets = windows[:, 1:, None]
    ppl_q = math.exp(-lq.gather(-1, targets).double().mean().item())
    ppl_r = math.exp(-lp.gather(-1, targets).double().mean().item())
    assert result.ppl_quantized == pytest.approx(ppl_q, rel=1e-5)
    assert result.ppl_reference == pytest.approx(ppl_r, rel=1e-5)
    assert result.degradation_pct == pytest.approx((ppl_q / ppl_r - 1) * 100, rel=1e-4)
    assert result.tokens == windows.shape[0] * (windows.shape[1] - 1)
    top1 = (lp.argmax(-1) == lq.argmax(-1)).float().mean().item()
    assert result.top1_agreement == pytest.approx(top1)


def test_topk_kl_is_a_close_lower_bound(models, windows):
    ref, q = models
    exact = compare_pass(q, windows, reference_pass(ref, windows, top_k=None)).kl_divergence
    assert exact > 0.05  # the perturbation is large enough for the bound to mean something
    previous = 0.0
    for k in (1, 4, 16):
        approx = compare_pass(q, windows, reference_pass(ref, windows, top_k=k))
        assert approx.kl_is_topk_approximation
        assert approx.kl_divergence <= exact + 1e-6  # log-sum inequality
        assert approx.kl_divergence >= previous - 1e-6  # a larger top-k only tightens the bound
        previous = approx.kl_divergence
    assert previous >= 0.9 * exact  # peaked distributions: top-16 of 64 carries nearly all the mass
    # top_k >= vocabulary is exact
    whole = compare_pass(q, windows, reference_pass(ref, windows, top_k=1000))
    assert not whole.kl_is_topk_approximation
    assert whole.kl_divergence == pytest.approx(exact, rel=1e-4)


def test_identical_models_give_zero_degradation_and_kl(models, windows):
    ref, _ = models
    twin = copy.deepcopy(ref)
    for top_k in (None, 8):
        result = compare_pass(twin, windows, reference_pass(ref, windows, top_k=top_k))
        assert result.degradation_pct == pytest.approx(0.0, abs=1e-9)
        assert abs(result.kl_divergence) < 1e-7
        assert result.top1_agreement == 1.0


def test_perturbed_model_has_positive_kl_and_changed_ppl(models, windows):
    ref, q = models
    result = compare_pass(q, None, reference_pass(ref, windows, top_k=8))
    assert result.kl_divergence > 0.01
    assert result.ppl_quantized != pytest.approx(result.ppl_reference, rel=1e-3)
    assert result.top1_agreement < 1.0


def test_compare_rejects_other_windows(models, windows):
    ref, q = models
    stats = reference_pass(ref, windows, top_k=4)
    with pytest.raises(ValueError, match="same tokens"):
        compare_pass(q, windows[:, :-1], stats)


def test_reference_stats_round_trip_through_a_file(models, windows, tmp_path):
    ref, q = models
    stats = reference_pass(ref, windows, top_k=8)
    stats.save(tmp_path / "ref.pt")
    loaded = ReferenceStats.load(tmp_path / "ref.pt")
    assert loaded.nbytes() == stats.nbytes()
    assert compare_pass(q, None, loaded).kl_divergence == compare_pass(q, None, stats).kl_divergence


def test_evaluate_languages_matches_per_language_passes(models, tiny_tokenizer):
    ref, q = models
    texts = {"en": TEXT_EN, "fr": [TEXT_FR, TEXT_FR]}
    results = evaluate_languages(
        ref, q, tiny_tokenizer, texts, seq_len=16, max_windows_per_language=3, top_k=8
    )
    assert list(results) == ["en", "fr"]
    for lang, text in texts.items():
        w = make_windows(tiny_tokenizer, text, 16, 3)
        direct = compare_pass(q, w, reference_pass(ref, w, top_k=8))
        assert results[lang].ppl_quantized == pytest.approx(direct.ppl_quantized, rel=1e-6)
        assert results[lang].kl_divergence == pytest.approx(direct.kl_divergence, rel=1e-6)
        assert results[lang].tokens == 3 * 15


def test_loaders_keep_one_model_in_memory(tiny_tokenizer):
    events: list[str] = []
    ref_alive: list[weakref.ref] = []

    def load_reference():
        model = tiny_llama(sharpen=30.0)
        model.register_forward_hook(lambda *_: events.append("ref"))
        ref_alive.append(weakref.ref(model))
        return model

    def load_quantized():
        gc.collect()
        events.append("load-q" if ref_alive[0]() is None else "load-q-while-ref-alive")
        model = perturbed(tiny_llama(sharpen=30.0))
        model.register_forward_hook(lambda *_: events.append("q"))
        return model

    results = evaluate_languages_from_loaders(
        load_reference, load_quantized, tiny_tokenizer, {"en": TEXT_EN, "fr": TEXT_FR}, seq_len=16, top_k=8
    )
    assert events.index("load-q") == events.count("ref")  # every reference forward ran before the load
    assert "load-q-while-ref-alive" not in events and events.count("q") == events.count("ref")
    assert all(r.kl_divergence > 0 for r in results.values())
    with pytest.raises(TypeError, match="zero-argument callable"):
        evaluate_languages_from_loaders(tiny_llama(), load_quantized, tiny_tokenizer, {"en": TEXT_EN})


# ---------------------------------------------------------------------------------------------------
# Gates
# ---------------------------------------------------------------------------------------------------


def fake_result(deg: float) -> LanguageResult:
    return LanguageResult(
        ppl_reference=10.0,
        ppl_quantized=10.0 * (1 + deg / 100),
        degradation_pct=deg,
        kl_divergence=0.01,
        kl_is_topk_approximation=True,
        tokens=100,
        windows=1,
        seq_len=101,
        top_k=64,
        top1_agreement=0.9,
    )


def test_gates_pass_and_fail():
    gates = QualityGates(max_degradation=2.0, max_language_degradation=3.0)
    ok = evaluate_gates({"en": fake_result(1.0), "fr": fake_result(2.5)}, gates)
    assert ok["max_degradation"] == {"limit": 2.0, "value": pytest.approx(1.75), "passed": True}
    assert (
        ok["max_language_degradation"]["passed"] and ok["max_language_degradation"]["worst_language"] == "fr"
    )
    assert ok["max_language_degradation"]["failed_languages"] == [] and all_passed(ok)

    # The average passes (1.5 %) but Hindi alone is over its limit: the per-language gate catches it.
    mixed = evaluate_gates(
        {
            "en": fake_result(0.0),
            "hi": fake_result(4.5),
            "ar": fake_result(3.5),
            "fr": fake_result(-2.0),
            "de": fake_result(-0.5),
        },
        gates,
    )
    assert mixed["max_degradation"]["passed"] is True
    lang = mixed["max_language_degradation"]
    assert lang["passed"] is False and lang["value"] == 4.5 and lang["worst_language"] == "hi"
    assert lang["failed_languages"] == ["hi", "ar"]
    assert not all_passed(mixed)

    at_limit = evaluate_gates({"en": fake_result(3.0)}, QualityGates(max_degradation=3.0))
    assert all_passed(at_limit)  # a value equal to its limit passes


def test_gates_nan_fails_and_empty_is_not_evaluated():
    result = evaluate_gates({"en": fake_result(1.0), "ja": fake_result(float("nan"))}, QualityGates())
    assert result["max_language_degradation"]["worst_language"] == "ja"
    assert result["max_language_degradation"]["failed_languages"] == ["ja"]
    assert not all_passed(result)
    empty = evaluate_gates({}, QualityGates())
    assert empty["max_degradation"]["passed"] is None and empty["max_degradation"]["value"] is None
    assert all_passed(empty) and not all_passed(empty, require_evaluated=True)


def test_quality_gates_validation():
    with pytest.raises(ValueError, match="--max-language-degradation"):
        QualityGates(max_language_degradation=-1)
    with pytest.raises(ValueError, match="--max-degradation"):
        QualityGates(max_degradation=float("inf"))
    assert QualityGates(max_degradation=1).max_degradation == 1.0


def test_summarize():
    results = {"en": fake_result(1.0), "fr": fake_result(3.0), "hi": fake_result(5.0)}
    avg, under = summarize(results, target=3.0)
    assert avg == pytest.approx(3.0) and under == 2
    assert summarize({}, 3.0) == (None, 0)
    assert summarize({k: v.to_dict() for k, v in results.items()}, 1.0) == (pytest.approx(3.0), 1)
