"""Calibration text written by the model itself, for when the user gives no data.

With no calibration data the model samples continuations of short, natural openers in each target
language (two or three per language, below), and those texts are then cut into token windows like
any other source. The tokens then come from the model's own distribution, which is what GPTQ's
Hessian should see; the cost is generation time (``num_samples × seq_len`` new tokens, batched)
and, for a small model, text that drifts away from the prompt's language. Report which languages
were self-generated (``CalibrationSet.self_generated``).

Sampling uses temperature 0.9 and nucleus sampling (top-p 0.95 within the 256 most likely
tokens, see :class:`NucleusSampler`) and never emits special tokens, so no text stops early and
every text has the same length. Randomness comes from one ``torch.Generator`` seeded with ``seed``:
the same seed, model, languages, sizes and batch size give the same texts, and the global RNG is
neither read nor changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from neural_quantization.calibration.sampling import CalibrationSet, sample_calibration, samples_per_language
from neural_quantization.calibration.sources import CalibrationDataError
from neural_quantization.config import DEFAULT_LANGUAGES
from neural_quantization.nn.modules import module_device

__all__ = ["PROMPTS", "NucleusSampler", "check_prompts", "generate_calibration_texts", "self_generated_calibration"]

logger = logging.getLogger(__name__)

# Openers in the style of news and web text, two or three per language.
PROMPTS: dict[str, tuple[str, ...]] = {
    "en": (
        "The city council met on Tuesday evening to discuss",
        "When I first moved to the countryside, I",
        "Scientists have long wondered why",
    ),
    "es": (
        "El ayuntamiento anunció ayer que",
        "Cuando era niño, mi abuela siempre me decía que",
        "Según los expertos, el cambio climático",
    ),
    "fr": (
        "Le conseil municipal s'est réuni mardi soir pour",
        "Quand j'étais enfant, ma grand-mère me racontait",
        "Selon les chercheurs, la principale raison",
    ),
    "de": (
        "Der Stadtrat hat am Dienstagabend beschlossen, dass",
        "Als ich zum ersten Mal nach Berlin kam,",
        "Nach Angaben der Polizei wurde",
    ),
    "zh": ("昨天下午，市政府宣布", "我小时候住在一个小村子里，", "据专家介绍，这种新技术"),
    "ja": ("昨日の午後、市役所は", "子供のころ、私は毎年夏になると", "専門家によると、この新しい技術は"),
    "ar": (
        "أعلنت وزارة الصحة اليوم أن",
        "عندما كنت صغيرا، كان جدي يقول لي",
        "يقول الخبراء إن التغير المناخي",
    ),
    "hi": (
        "सरकार ने आज घोषणा की कि",
        "जब मैं छोटा था, मेरी दादी मुझे",
        "विशेषज्ञों के अनुसार, इस नई तकनीक से",
    ),
    "pt": (
        "A prefeitura anunciou nesta terça-feira que",
        "Quando eu era criança, minha avó sempre dizia que",
        "De acordo com os especialistas, a principal causa",
    ),
    "ru": (
        "Вчера вечером городской совет объявил, что",
        "Когда я был маленьким, бабушка часто рассказывала мне",
        "По словам экспертов, главная причина",
    ),
    "ko": ("어제 오후 시청은", "어렸을 때 나는 여름마다", "전문가들에 따르면 이 새로운 기술은"),
    "it": (
        "Il consiglio comunale ha annunciato ieri che",
        "Quando ero bambino, mia nonna mi raccontava",
        "Secondo gli esperti, la causa principale",
    ),
    "tr": (
        "Belediye dün yaptığı açıklamada",
        "Çocukken her yaz büyükannemin köyüne",
        "Uzmanlara göre bu yeni teknoloji",
    ),
    "nl": (
        "De gemeenteraad heeft dinsdagavond besloten dat",
        "Toen ik klein was, vertelde mijn oma me vaak",
        "Volgens deskundigen is de belangrijkste oorzaak",
    ),
    "pl": (
        "Rada miasta ogłosiła we wtorek, że",
        "Kiedy byłem dzieckiem, babcia często opowiadała mi",
        "Według ekspertów główną przyczyną",
    ),
}
assert set(PROMPTS) == set(DEFAULT_LANGUAGES)


def _model_dtype(model: Any) -> torch.dtype:
    try:
        return next(model.parameters()).dtype
    except StopIteration:
        return torch.float32


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask), both (len(rows), max_len)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


class NucleusSampler:
    """A logits processor that *samples* the next token, so ``generate`` can run greedily.

    Per row of ``scores`` (batch, vocab): ban ``banned_ids`` (special tokens, so the text never
    ends early or contains markup), keep the ``candidates`` most likely tokens, and of those the
    smallest prefix whose probability (softmax of ``scores / temperature`` over the full vocabulary)
    reaches ``top_p``; then draw one token from the kept ones, renormalised, with the exponential-race
    (Gumbel-max) trick: ``argmax(logit / T - log E)``, ``E ~ Exp(1)`` from the seeded ``generator``.
    It returns scores that are 0 at the drawn token and -inf elsewhere, so greedy decoding picks it.

    Why not ``generate(do_sample=True, top_p=...)``: that sorts the whole vocabulary and calls
    ``torch.multinomial`` every step, which on a CPU cost more than the model itself (SmolLM2,
    batch 16: ~65 ms of a ~160 ms step), and it draws from the global RNG.
    """

    def __init__(
        self,
        generator: torch.Generator,
        temperature: float,
        top_p: float,
        candidates: int = 256,
        banned_ids: Sequence[int] = (),
    ) -> None:
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.generator = generator
        self.temperature = temperature
        self.top_p = top_p
        self.candidates = candidates
        self.banned_ids = sorted({int(i) for i in banned_ids})

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature  # (B, V)
        banned = [i for i in self.banned_ids if i < logits.shape[-1]]
        if banned:
            logits[:, banned] = float("-inf")
        top, idx = logits.topk(min(self.candidates, logits.shape[-1]), dim=-1)  # (B, k), descending
        probs = torch.exp(top - torch.logsumexp(logits, dim=-1, keepdim=True))
        keep = (probs.cumsum(-1) - probs) < self.top_p  # the first token is always kept
        race = torch.empty_like(top).exponential_(generator=self.generator)
        choice = torch.where(keep, top - race.log(), float("-inf")).argmax(-1, keepdim=True)  # (B, 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, idx.gather(-1, choice), 0.0)


def _use_bf16_autocast(setting: bool | None, model: Any, device: torch.device) -> bool:
    if setting is not None:
        return setting
    if device.type != "cpu" or _model_dtype(model) != torch.float32:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@torch.no_grad()
def check_prompts(languages: list[str], prompts: dict[str, list[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """The prompt table (:data:`PROMPTS` plus ``prompts``); raise when a language has no prompt, before
    any model runs (the CLI calls it from its checks)."""
    table = {**PROMPTS, **{k: tuple(v) for k, v in (prompts or {}).items()}}
    unknown = [lang for lang in languages if not table.get(lang)]
    if unknown:
        raise CalibrationDataError(
            f"No built-in prompts for language(s) {', '.join(unknown)} (--target-languages {' '.join(unknown)}; "
            f"built in: {', '.join(PROMPTS)}). "
            "Give text for them with --calibration-data (and --eval-data), or pass prompts={lang: [openers]}."
        )
    return table


def generate_calibration_texts(
    model: Any,
    tokenizer: Any,
    languages: Sequence[str] | None,
    num_samples: int,
    seq_len: int,
    seed: int,
    device: str | torch.device | None = None,
    *,
    batch_size: int = 32,
    temperature: float = 0.9,
    top_p: float = 0.95,
    prompts: Mapping[str, Sequence[str]] | None = None,
    bf16_autocast: bool | None = None,
) -> dict[str, list[str]]:
    """Let the model write ``num_samples`` texts, split over ``languages`` like the windows will be.

    Each language gets ``samples_per_language(num_samples, languages)[lang]`` texts; text j starts
    from that language's prompt ``j % n_prompts`` and continues for exactly ``seq_len`` new tokens
    (special tokens are never sampled), so each text yields one full window. Returns
    ``{lang: [prompt + continuation, ...]}``.

    ``device`` is where the inputs go (default: the model's device); the model must already be
    there. ``prompts`` overrides or extends :data:`PROMPTS` (needed for languages outside the 15).
    ``bf16_autocast`` (default: on for a float32 model on a CPU with bf16 matrix units) runs the
    generation under ``torch.autocast("cpu", bfloat16)``; the model's weights are not changed.
    Measured on the project's 2-core Xeon build box (AMX; shared with other jobs, load ~4.5;
    ``torch.set_num_threads(1)``), SmolLM2-135M in float32, 16 texts × 256 new tokens over 4
    languages: 40 s with this sampler and bf16 autocast, 51 s without autocast, 81 s with
    ``generate(do_sample=True, top_p=0.95)``. With 2 torch threads on that loaded box the same work
    ran about 6× slower (OpenMP threads waiting on busy cores); on an idle machine 2 threads help.
    """
    langs = list(dict.fromkeys(languages if languages is not None else DEFAULT_LANGUAGES))
    table = check_prompts(langs, prompts)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    counts = samples_per_language(num_samples, langs)
    dev = torch.device(device) if device is not None else module_device(model)

    jobs: list[tuple[str, list[int]]] = []  # (language, prompt token ids), in a fixed order
    for lang in langs:
        openers = table[lang]
        for j in range(counts[lang]):
            jobs.append(
                (lang, list(tokenizer(openers[j % len(openers)], add_special_tokens=True)["input_ids"]))
            )

    from transformers import LogitsProcessorList

    generator = torch.Generator(device=dev)
    generator.manual_seed(int(seed))
    banned = set(getattr(tokenizer, "all_special_ids", []) or [])
    banned.update(i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None)
    sampler = NucleusSampler(generator, temperature, top_p, banned_ids=sorted(banned))
    autocast = _use_bf16_autocast(bf16_autocast, model, dev)

    texts: dict[str, list[str]] = {lang: [] for lang in langs}
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        # One autocast region for all batches: the bf16 copies of the weights are made once.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for b in range(0, len(jobs), batch_size):
                batch = jobs[b : b + batch_size]
                ids, mask = _left_pad([p for _, p in batch], pad_id)
                out = model.generate(
                    input_ids=ids.to(dev),
                    attention_mask=mask.to(dev),
                    do_sample=False,  # the sampler above does the sampling
                    logits_processor=LogitsProcessorList([sampler]),
                    max_new_tokens=seq_len,
                    min_new_tokens=seq_len,
                    pad_token_id=pad_id,
                )
                for (lang, _), row, m in zip(batch, out.cpu(), mask):
                    texts[lang].append(tokenizer.decode(row[int((m == 0).sum()) :], skip_special_tokens=True))
                logger.info(
                    "self-generated calibration: %d/%d texts (%d new tokens each), %.1f s",
                    min(b + batch_size, len(jobs)),
                    len(jobs),
                    seq_len,
                    time.perf_counter() - start,
                )
    finally:
        model.train(was_training)
    return texts


# Repeats generate_calibration_texts' parameters on purpose: a thin wrapper with the same call.
def self_generated_calibration(
    model: Any,
    tokenizer: Any,
    languages: Sequence[str] | None,
    num_samples: int,
    seq_len: int,
    seed: int,
    device: str | torch.device | None = None,
    *,
    model_name: str | None = None,
    **generate_kwargs: Any,
) -> CalibrationSet:
    """:func:`generate_calibration_texts` then :func:`sample_calibration`: (num_samples, seq_len) windows.

    The set is marked ``self_generated=True`` and its ``source`` reads "self-generated by
    <model_name> (seed <seed>)"; pass ``model_name=LoadedModel.source`` for a readable name (the
    default is ``model.config._name_or_path``). Extra keyword arguments go to the generator
    (``batch_size``, ``temperature``, ``top_p``, ``prompts``, ``bf16_autocast``).
    """
    langs = list(dict.fromkeys(languages if languages is not None else DEFAULT_LANGUAGES))
    texts = generate_calibration_texts(
        model, tokenizer, langs, num_samples, seq_len, seed, device, **generate_kwargs
    )
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return sample_calibration(
        texts,
        tokenizer,
        num_samples,
        seq_len,
        seed,
        langs,
        source=f"self-generated by {name} (seed {seed})",
        self_generated=True,
    )
