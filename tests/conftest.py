"""Shared test fixtures: a tiny offline tokenizer, tiny random models of every supported
architecture (``from conftest import tiny_config, tiny_model, tiny_tokens``) and the workspace's
multilingual data (if present)."""

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


def make_tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer (300 tokens; GGUF's "gpt2" model) trained in milliseconds on
    TINY_CORPUS. Special tokens: <|endoftext|>=0 (eos), <s>=1 (bos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TINY_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")


#: The tiny decoder the tests share: 2 layers, hidden 64 = 4 heads of 16 (2 KV heads: GQA), MLP 80
#: (2.5 groups of 32, so ragged groups are exercised), vocabulary 96 (token ids 0/1 special).
TINY_CONFIG = dict(
    vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, eos_token_id=1, bos_token_id=0, pad_token_id=0,
)
#: What each architecture adds to TINY_CONFIG (Gemma and Qwen3 need head_dim; Gemma-3 mixes sliding
#: and full attention layers).
_ARCHITECTURE_EXTRAS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "gemma3": (
        "Gemma3TextConfig", {"head_dim": 16, "sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]}
    ),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "phi3": ("Phi3Config", {}),  # fused qkv_proj and gate_up_proj
}
TINY_ARCHITECTURES = tuple(_ARCHITECTURE_EXTRAS)


def tiny_config(arch: str = "llama", **overrides):
    """The transformers config of the tiny ``arch`` decoder: TINY_CONFIG, the arch's extras, ``overrides``."""
    import transformers

    class_name, extras = _ARCHITECTURE_EXTRAS[arch]
    return getattr(transformers, class_name)(**{**TINY_CONFIG, **extras, **overrides})


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random ``arch`` model in eval mode, initialised after ``torch.manual_seed(seed)``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()


def tiny_tokens(n: int = 8, length: int = 24, seed: int = 1, vocab_size: int = TINY_CONFIG["vocab_size"]):
    """(n, length) random token ids in [2, vocab_size) (no special tokens), from their own generator."""
    return torch.randint(2, vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def shared_data_dir() -> Path | None:
    """``../shared/data/multilingual`` next to the repository, or None where it does not exist."""
    path = (REPO_ROOT / ".." / "shared" / "data" / "multilingual").resolve()
    return path if path.is_dir() else None


def save_tiny_llama(path: Path, tokenizer=None, **overrides) -> Path:
    """A tiny random Llama (2 layers, hidden 64, context 256) with ``tokenizer`` (default: the
    word-level one, adding BOS), saved to ``path`` like a downloaded Hugging Face model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = tokenizer or make_tiny_tokenizer(add_bos=True)
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
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
