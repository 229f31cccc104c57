"""Shared test fixtures: a tiny offline tokenizer and the workspace's multilingual data (if present)."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never touch the Hugging Face hub: fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Without a GPU the Triton kernels are tested through Triton's interpreter. The variable must be
# set before any module imports triton (any test importing neural_quantization may), so here.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_CORPUS = [
    "the cat sat on the mat and the dog sat on the rug",
    "a bird sings in the tree while the sun rises over the hill",
    "le chat dort sur le tapis et le chien mange dans la cuisine",
    "der hund läuft im park und die katze schläft auf dem sofa",
    "el perro corre en el parque y el gato duerme en la casa",
]


def make_tiny_tokenizer(add_bos: bool = False):
    """A word-level ``PreTrainedTokenizerFast`` over TINY_CORPUS, built offline in milliseconds.

    Special tokens: [PAD]=0, [UNK]=1, <s>=2 (bos), </s>=3 (eos). With ``add_bos`` it prepends <s>
    by default, like Llama/Gemma tokenizers do.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>"]
    words = sorted({w for line in TINY_CORPUS for w in line.split()})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def shared_data_dir() -> Path | None:
    """``../shared/data/multilingual`` next to the repository, or None where it does not exist."""
    path = (REPO_ROOT / ".." / "shared" / "data" / "multilingual").resolve()
    return path if path.is_dir() else None


def save_tiny_llama(path: Path, **overrides) -> Path:
    """A tiny random Llama (2 layers, hidden 64, context 256) with the word-level tokenizer, saved to
    ``path`` like a downloaded Hugging Face model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = make_tiny_tokenizer(add_bos=True)
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
        initializer_range=0.3,  # peaked predictions, so 2-bit rounding visibly hurts perplexity
    )
    settings.update(overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**settings)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, saved like a downloaded HF model."""
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def text_dir(tmp_path):
    """Calibration and evaluation text in two 'languages' (the tiny tokenizer's vocabulary)."""
    directory = tmp_path / "texts"
    directory.mkdir()
    for lang, lines in {"en": TINY_CORPUS[:2], "fr": TINY_CORPUS[2:]}.items():
        for split in ("calib", "eval"):
            (directory / f"{lang}.{split}.txt").write_text("\n".join(lines * 20) + "\n")
    return directory
