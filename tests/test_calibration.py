"""Calibration sources, balanced window sampling and self-generated calibration (CPU, offline)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CORPUS, make_tiny_tokenizer

from neural_quantization.calibration import (
    CalibrationDataError,
    calibration_from_source,
    generate_calibration_texts,
    load_language_texts,
    sample_calibration,
    samples_per_language,
    self_generated_calibration,
)

# ---------------------------------------------------------------------------------------------- sources


def test_directory_prefers_split_file_and_never_reads_eval(tmp_path):
    (tmp_path / "en.calib.txt").write_text("calib one\n\n  calib two  \n", encoding="utf-8")
    (tmp_path / "en.txt").write_text("plain en\n", encoding="utf-8")
    (tmp_path / "fr.txt").write_text("bonjour\nsalut\n\n", encoding="utf-8")
    (tmp_path / "fr.eval.txt").write_text("EVAL ONLY\n", encoding="utf-8")
    texts = load_language_texts(tmp_path, ["en", "fr"])
    assert texts == {"en": ["calib one", "calib two"], "fr": ["bonjour", "salut"]}
    # languages=None takes every language with a file; eval files are not calibration languages
    assert load_language_texts(str(tmp_path), None) == texts
    assert load_language_texts(tmp_path, ["fr"], split="eval") == {"fr": ["EVAL ONLY"]}


def test_missing_language_error_names_file_and_fix(tmp_path):
    (tmp_path / "en.calib.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(CalibrationDataError) as e:
        load_language_texts(tmp_path, ["en", "hi"])
    msg = str(e.value)
    assert "hi.calib.txt" in msg and "hi.txt" in msg and "--target-languages" in msg and "(en)" in msg


def test_single_file_keyed_by_language_code_or_text(tmp_path):
    fr = tmp_path / "fr.calib.txt"
    fr.write_text("un\ndeux\n", encoding="utf-8")
    assert load_language_texts(fr, ["en", "fr"]) == {"fr": ["un", "deux"]}
    notes = tmp_path / "notes.txt"
    notes.write_text("a\nb\n", encoding="utf-8")
    assert load_language_texts(notes, ["en"]) == {"text": ["a", "b"]}


def test_list_and_dict_sources():
    assert load_language_texts(["one\ntwo", "", "three"], None) == {"text": ["one", "two", "three"]}
    data = {"en": ["hello there", ""], "de": "hallo\nwelt", "fr": ["ignored"]}
    assert load_language_texts(data, "en,de") == {"en": ["hello there"], "de": ["hallo", "welt"]}
    with pytest.raises(CalibrationDataError, match="no entry for language\\(s\\) ja"):
        load_language_texts(data, ["en", "ja"])


@pytest.mark.parametrize("source", [[], ["", "  \n"], {"en": ["", ""]}])
def test_empty_data_error_says_how_to_fix(source):
    with pytest.raises(CalibrationDataError, match="holds no text.*one sentence or paragraph per line"):
        load_language_texts(source, None)


def test_empty_file_and_missing_path(tmp_path):
    (tmp_path / "en.calib.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="holds no text"):
        load_language_texts(tmp_path, ["en"])
    with pytest.raises(CalibrationDataError, match="No such file or directory"):
        load_language_texts(tmp_path / "nope", ["en"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="holds no calibration files"):
        load_language_texts(tmp_path / "empty", None)


def test_shared_multilingual_data(shared_data_dir):
    if shared_data_dir is None:
        pytest.skip("../shared/data/multilingual is not present on this machine")
    texts = load_language_texts(shared_data_dir, ["en", "ja", "ar"])
    assert set(texts) == {"en", "ja", "ar"}
    eval_en = set(load_language_texts(shared_data_dir, ["en"], split="eval")["en"])
    assert len(texts["en"]) > 100 and not (set(texts["en"]) & eval_en)  # calib and eval are disjoint
    assert all(line == line.strip() and line for lines in texts.values() for line in lines)


# ---------------------------------------------------------------------------------------------- sampling

TEXTS = {
    "en": TINY_CORPUS[:2] * 4,  # ~100 tokens
    "fr": TINY_CORPUS[2:3] * 6,
    "de": TINY_CORPUS[3:4] * 6,
}


def test_samples_per_language_spreads_remainder_and_rejects_too_few():
    assert samples_per_language(8, ["en", "fr", "de"]) == {"en": 3, "fr": 3, "de": 2}
    assert samples_per_language(6, ["en", "fr", "de"]) == {"en": 2, "fr": 2, "de": 2}
    with pytest.raises(CalibrationDataError, match="at least 3"):
        samples_per_language(2, ["en", "fr", "de"])


def test_balanced_windows_of_exact_length(tiny_tokenizer):
    calib = sample_calibration(TEXTS, tiny_tokenizer, num_samples=8, seq_len=12, seed=0)
    assert calib.input_ids.shape == (8, 12) and calib.input_ids.dtype == torch.long
    assert calib.sample_languages == ["en", "fr", "de", "en", "fr", "de", "en", "fr"]
    assert calib.tokens_per_language == {"en": 36, "fr": 36, "de": 24}
    assert not calib.self_generated
    # every window is a contiguous slice of its language's token stream
    for row, lang in zip(calib.input_ids.tolist(), calib.sample_languages):
        stream = tiny_tokenizer("\n".join(TEXTS[lang]), add_special_tokens=False)["input_ids"]
        assert any(stream[s : s + 12] == row for s in range(len(stream) - 11)), lang
    assert [b.shape[0] for b in calib.batches(3)] == [3, 3, 2]


def test_disjoint_windows_when_text_allows(tiny_tokenizer):
    calib = sample_calibration({"en": TEXTS["en"]}, tiny_tokenizer, num_samples=4, seq_len=10, seed=3)
    rows = [tuple(r) for r in calib.input_ids.tolist()]
    assert len(set(rows)) == 4


def test_bos_prepended_when_tokenizer_adds_it():
    tok = make_tiny_tokenizer(add_bos=True)
    calib = sample_calibration(TEXTS, tok, num_samples=3, seq_len=9, seed=0)
    assert calib.input_ids.shape == (3, 9)
    assert (calib.input_ids[:, 0] == tok.bos_token_id).all()
    assert (calib.input_ids[:, 1:] != tok.bos_token_id).all()


def test_deterministic_with_seed_and_different_across_seeds(tiny_tokenizer):
    a = sample_calibration(TEXTS, tiny_tokenizer, 6, 8, seed=1)
    b = sample_calibration(TEXTS, tiny_tokenizer, 6, 8, seed=1)
    c = sample_calibration(TEXTS, tiny_tokenizer, 6, 8, seed=2)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    # one language's windows do not depend on which other languages are present
    en_only = sample_calibration({"en": TEXTS["en"]}, tiny_tokenizer, 2, 8, seed=1)
    assert torch.equal(en_only.input_ids, a.input_ids[[0, 3]])


def test_too_short_language_error(tiny_tokenizer):
    with pytest.raises(CalibrationDataError) as e:
        sample_calibration({"en": ["the cat sat"]}, tiny_tokenizer, 2, 16, seed=0)
    msg = str(e.value)
    assert "only 3 tokens" in msg and "--seq-len" in msg and "at most 3" in msg


def test_requested_language_without_text(tiny_tokenizer):
    with pytest.raises(CalibrationDataError, match="language\\(s\\) ja"):
        sample_calibration(TEXTS, tiny_tokenizer, 4, 8, seed=0, languages=["en", "ja"])


def test_calibration_from_directory(tmp_path, tiny_tokenizer):
    for lang, lines in TEXTS.items():
        (tmp_path / f"{lang}.calib.txt").write_text("\n".join(lines), encoding="utf-8")
    calib = calibration_from_source(tmp_path, tiny_tokenizer, ["fr", "de"], 4, 10, seed=0)
    assert calib.languages == ["fr", "de"] and calib.input_ids.shape == (4, 10)
    assert calib.source == str(tmp_path)


# ------------------------------------------------------------------------------------ self-generated


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok


def test_self_generation_reproducible_with_seed(tiny_llama):
    model, tok = tiny_llama
    prompts = {"en": ["the cat sat", "a bird sings"], "fr": ["le chat dort"]}
    rng_before = torch.get_rng_state()
    a = generate_calibration_texts(model, tok, ["en", "fr"], 5, 12, seed=7, prompts=prompts)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    b = generate_calibration_texts(model, tok, ["en", "fr"], 5, 12, seed=7, prompts=prompts, batch_size=32)
    c = generate_calibration_texts(model, tok, ["en", "fr"], 5, 12, seed=8, prompts=prompts)
    assert a == b and a != c
    assert [len(a["en"]), len(a["fr"])] == [3, 2]
    assert a["en"][0].startswith("the cat sat") and a["en"][1].startswith("a bird sings")
    assert a["fr"][0].startswith("le chat dort")
    # seq_len new tokens per text (EOS suppressed), plus the prompt
    n_tokens = len(tok(a["en"][0], add_special_tokens=False)["input_ids"])
    assert n_tokens >= 12


def test_self_generated_calibration_set(tiny_llama):
    model, tok = tiny_llama
    prompts = {"en": ["the cat sat"], "de": ["der hund läuft"]}
    calib = self_generated_calibration(model, tok, ["en", "de"], 4, 10, seed=0, prompts=prompts, batch_size=2)
    assert calib.self_generated and calib.input_ids.shape == (4, 10)
    assert calib.source == "self-generated by LlamaForCausalLM (seed 0)"
    assert calib.languages == ["en", "de"] and calib.sample_languages == ["en", "de", "en", "de"]
    again = self_generated_calibration(model, tok, ["en", "de"], 4, 10, seed=0, prompts=prompts, batch_size=2)
    assert torch.equal(calib.input_ids, again.input_ids)


def test_self_generation_unknown_language_needs_prompts(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(
        CalibrationDataError, match="No built-in prompts for language\\(s\\) sw.*--calibration-data"
    ):
        generate_calibration_texts(model, tok, ["en", "sw"], 2, 8, seed=0)


def test_nucleus_sampler_matches_distribution_and_bans_tokens():
    from neural_quantization.calibration.self_generated import NucleusSampler

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0001]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    # temperature 1, top_p 0.9: keeps {0, 1, 2} (mass 0.95 >= 0.9), renormalised to 0.5/0.95, ...
    out = NucleusSampler(g, temperature=1.0, top_p=0.9)(None, logits)
    assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out[out != 0]).all()
    freq = torch.bincount(out.argmax(-1), minlength=5).float() / 4000
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0, 0.0]) / 0.95
    assert torch.allclose(freq, expected, atol=0.03), freq
    # banned tokens are never drawn, even the most likely one
    out = NucleusSampler(g, temperature=1.0, top_p=1.0, banned_ids=[0])(None, logits)
    assert (out.argmax(-1) != 0).all()
    # top_p -> 0 is greedy
    out = NucleusSampler(g, temperature=1.0, top_p=1e-6)(None, logits)
    assert (out.argmax(-1) == 0).all()
