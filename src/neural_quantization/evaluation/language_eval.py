"""Perplexity and KL divergence per language, reference vs quantized, one model in memory at a time.

Windows
-------
Each language's text is tokenized once, without special tokens, into one token stream. It is cut
into non-overlapping windows of ``seq_len`` tokens; the ragged tail is dropped. When the tokenizer
has a BOS token and normally adds it (Llama, Gemma, Mistral), every window starts with BOS followed
by the next ``seq_len - 1`` tokens of the stream, as llama.cpp's ``perplexity`` does: models such as
Gemma are badly calibrated on a window that does not start with BOS, and a text token is still never
scored twice::

    stream   t0 t1 t2 t3 t4 t5 t6 t7 t8 ...          seq_len = 4, tokenizer adds BOS
    windows  [BOS t0 t1 t2] [BOS t3 t4 t5] [BOS t6 t7 t8]

Without BOS the windows are plain slices ``stream[i*seq_len:(i+1)*seq_len]``. Reference and quantized
model always see the very same windows (the reference pass stores them). The BOS rule, the token
stream and the cutting are calibration's (``calibration/sampling.py``: ``bos_prefix``,
``token_stream``, ``cut_windows``): calibration draws its windows at random offsets, evaluation
takes them in order.

Perplexity
----------
A window ``x_0 .. x_{T-1}`` (T = seq_len) yields T-1 predictions: the logits at position t-1 score
token x_t, for t = 1..T-1. Over all N = n_windows · (T-1) predicted tokens of a language::

    PPL = exp( -(1/N) · Σ log p(x_t | x_<t) )

and the degradation is ``(PPL_q / PPL_ref - 1) · 100`` %. Log-probabilities are computed in fp32
from ``model(input_ids).logits`` whatever the model's dtype.

KL divergence
-------------
Per predicted position, with P the reference's and Q the quantized model's next-token
distribution over the vocabulary V::

    KL(P || Q) = Σ_v P(v) · (log P(v) - log Q(v))

reported as its mean over all predicted positions of a language (nats). It is zero only when the
two distributions agree everywhere, so it sees damage that a perplexity average can hide (a model
that is worse on some tokens and better on others).

To free the reference model before the quantized one is loaded, :func:`reference_pass` keeps only
what the comparison needs, per position: the log-prob of the true token, the reference's top-k
log-probs with their token ids (set S), and the log of the remaining mass ``log P(V \\ S)``. The
KL is then evaluated with the tail folded into one bucket::

    KL_k = Σ_{v in S} P(v) (log P(v) - log Q(v))  +  P(V\\S) (log P(V\\S) - log Q(V\\S))

where Q(V\\S) is summed from the quantized model's full distribution. By the log-sum inequality,
``Σ_{v in V\\S} P(v) log(P(v)/Q(v)) >= P(V\\S) log(P(V\\S)/Q(V\\S))``, so KL_k is a *lower bound*
of the full KL, exact when k = |V| or when Q is proportional to P on the tail. For LLMs the top 64
tokens usually carry almost all of the reference's mass and the bound is tight. ``top_k=None`` keeps
the full log-softmax instead (exact KL; n · (T-1) · |V| floats, so only for small vocabularies).

Memory
------
One forward at a time over ``batch_size`` windows. The fp32 log-softmax (and, for the KL tail, its
exponential) is taken over chunks of positions holding at most 2**25 floats (128 MB) each, so
Gemma-3's 262k vocabulary is processed ~128 positions at a time at batch size 1; the model's own
logits tensor (b, T, V) comes on top. The stored reference statistics cost
``n · (T-1) · (12·k + 8)`` bytes (~26 MB for 64 windows of 512 tokens at k = 64).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neural_quantization.calibration.sampling import bos_prefix, cut_windows, token_stream
from neural_quantization.nn.modules import module_device

DEFAULT_TOP_K = 64
# Floats of fp32 log-softmax alive at once (per chunk of positions); 2**25 floats = 128 MB.
_LOGSOFTMAX_BUDGET = 2**25

ModelOrLoader = nn.Module | Callable[[], nn.Module]
TextSource = str | Sequence[str]


# --------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer has a BOS token and puts it in front of a text by default
    (the rule of ``calibration/sampling.py``'s :func:`bos_prefix`, which calibration uses too)."""
    return bool(bos_prefix(tokenizer))


def _join(text: TextSource) -> str:
    if isinstance(text, str):
        return text
    parts = [t for t in text if t and t.strip()]
    return "\n\n".join(parts)


def make_windows(
    tokenizer: Any, text: TextSource, seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Tokenize ``text`` once and cut it into non-overlapping windows of ``seq_len`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with ``__call__`` returning ``input_ids`` and
            ``bos_token_id``).
        text: one string, or a list of strings (joined with blank lines before tokenizing).
        seq_len: tokens per window, BOS included when the tokenizer adds one (>= 2).
        max_windows: keep only the first ``max_windows`` windows (None = all).

    Returns:
        LongTensor of shape ``(n_windows, seq_len)``; see the module docstring for the BOS rule.

    Raises:
        ValueError: ``seq_len < 2``, ``max_windows < 1``, or fewer tokens than one full window.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}: a window needs at least 2 tokens (e.g. --eval-seq-len 512).")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows={max_windows!r} must be a positive integer, or None for all windows.")
    stream = torch.tensor(token_stream(tokenizer, _join(text)), dtype=torch.long)  # (n_tokens,)
    prefix = bos_prefix(tokenizer)  # [BOS] or []
    body = seq_len - len(prefix)  # text tokens per window
    n = stream.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"the text has {stream.numel()} tokens, fewer than one full window of {seq_len} tokens; "
            f"give more text or choose a smaller --eval-seq-len (at most {stream.numel() + len(prefix)})."
        )
    return cut_windows(stream, range(0, n * body, body), seq_len, prefix)  # consecutive, non-overlapping


# --------------------------------------------------------------------------------------------------
# Running a model
# --------------------------------------------------------------------------------------------------


def _place(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Where inputs go. With ``device`` given the model is moved there (unless accelerate placed it)."""
    if device is not None and not getattr(model, "hf_device_map", None):
        model.to(torch.device(device))
        return torch.device(device)
    return module_device(model)


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if (
        not isinstance(windows, torch.Tensor)
        or windows.dim() != 2
        or windows.shape[1] < 2
        or windows.shape[0] < 1
    ):
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(
            f"windows must be a (n_windows >= 1, seq_len >= 2) token tensor from make_windows; got {shape}."
        )
    return windows.long()


def _iter_logprobs(
    model: nn.Module, windows: torch.Tensor, batch_size: int, device: str | torch.device | None
) -> Iterator[tuple[slice, slice, torch.Tensor, torch.Tensor]]:
    """Yield fp32 next-token log-probs chunk by chunk.

    Yields ``(rows, cols, logprobs, targets)``: ``logprobs`` has shape ``(b, c, V)`` and scores
    ``targets = windows[rows, 1:][:, cols]`` of shape ``(b, c)``; ``cols`` indexes the T-1 predicted
    positions. The model is put in eval mode for the pass and restored afterwards.
    """
    windows = _check_windows(windows)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    dev = _place(model, device)
    was_training = model.training
    model.eval()
    n, seq_len = windows.shape
    try:
        with torch.no_grad():
            for r0 in range(0, n, batch_size):
                rows = slice(r0, min(n, r0 + batch_size))
                ids = windows[rows].to(dev)  # (b, T)
                out = model(input_ids=ids, use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out  # (b, T, V)
                if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                    raise ValueError(
                        f"the model returned logits of shape {tuple(logits.shape)} for input {tuple(ids.shape)}; "
                        "evaluation needs a causal LM that returns (batch, seq_len, vocab) logits."
                    )
                b, _, vocab = logits.shape
                targets = ids[:, 1:]  # (b, T-1)
                chunk = max(1, _LOGSOFTMAX_BUDGET // (b * vocab))
                for c0 in range(0, seq_len - 1, chunk):
                    cols = slice(c0, min(seq_len - 1, c0 + chunk))
                    logprobs = torch.log_softmax(logits[:, cols].float(), dim=-1)  # (b, c, V)
                    yield rows, cols, logprobs, targets[:, cols]
                del out, logits
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Reference statistics
# --------------------------------------------------------------------------------------------------


def _tail_logmass(logprobs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log Σ_{v not in indices} exp(logprobs[..., v]): the log-mass outside a top-k set.

    ``logprobs`` (b, c, V), ``indices`` (b, c, k) -> (b, c). Summing the probabilities with the
    top-k zeroed (rather than ``log(1 - Σ top-k)``) keeps tiny tails accurate; -inf when empty.
    """
    probs = logprobs.exp()  # (b, c, V)
    probs.scatter_(-1, indices, 0.0)
    return probs.sum(-1).log()


@dataclass
class ReferenceStats:
    """What the reference model said about a set of windows: everything comparison needs.

    Shapes (n = windows, T = seq_len, P = T-1 predicted positions per window, k = top_k):

    - ``windows``: (n, T) int64, the exact tokens scored.
    - ``token_logprobs``: (n, P) fp32, log P(x_t | x_<t) of the true next token.
    - ``topk_logprobs``: (n, P, k) fp32, the reference's k largest log-probs, descending.
    - ``topk_indices``: (n, P, k) int64, their token ids.
    - ``tail_logmass``: (n, P) fp32, log of the probability outside the top k (-inf if none).
    - ``full_logprobs``: (n, P, V) fp32 instead of the three above when ``top_k`` is None.
    """

    windows: torch.Tensor
    token_logprobs: torch.Tensor
    vocab_size: int
    top_k: int | None
    topk_logprobs: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None
    full_logprobs: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        """Number of predicted (scored) tokens."""
        return self.token_logprobs.numel()

    @property
    def kl_is_topk_approximation(self) -> bool:
        """True when the KL against these stats is the top-k lower bound rather than exact."""
        return self.top_k is not None and self.top_k < self.vocab_size

    def mean_nll(self) -> float:
        return float(-self.token_logprobs.double().mean())

    def perplexity(self) -> float:
        return math.exp(self.mean_nll())

    def nbytes(self) -> int:
        tensors = (
            self.windows,
            self.token_logprobs,
            self.topk_logprobs,
            self.topk_indices,
            self.tail_logmass,
            self.full_logprobs,
        )
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def save(self, path: str | Path) -> None:
        """Save to a ``torch.save`` file so a reference pass can be reused across runs."""
        torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        return cls(**torch.load(Path(path), map_location="cpu", weights_only=True))


def reference_pass(
    model: nn.Module,
    windows: torch.Tensor,
    top_k: int | None = DEFAULT_TOP_K,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> ReferenceStats:
    """Run the reference model once over ``windows`` and keep what the comparison needs.

    Args:
        model: causal LM; ``model(input_ids=...).logits`` of shape (b, T, V).
        windows: (n, T) token ids from :func:`make_windows`.
        top_k: reference log-probs kept per position for the KL (default 64); clamped to the
            vocabulary size. None keeps the full log-softmax (exact KL; small vocabularies only).
        batch_size: windows per forward.
        device: where to run (the model is moved there); None keeps the model where it is.

    Returns:
        :class:`ReferenceStats` on the CPU, so the model can be freed afterwards.
    """
    windows = _check_windows(windows).cpu()
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer (e.g. 64) or None for the exact KL.")
    n, seq_len = windows.shape
    p = seq_len - 1
    token_lp = torch.empty(n, p, dtype=torch.float32)
    stats: ReferenceStats | None = None
    for rows, cols, logprobs, targets in _iter_logprobs(model, windows, batch_size, device):
        if stats is None:
            vocab = logprobs.shape[-1]
            k = None if top_k is None else min(top_k, vocab)
            stats = ReferenceStats(windows=windows, token_logprobs=token_lp, vocab_size=vocab, top_k=k)
            if k is None:
                stats.full_logprobs = torch.empty(n, p, vocab, dtype=torch.float32)
            else:
                stats.topk_logprobs = torch.empty(n, p, k, dtype=torch.float32)
                stats.topk_indices = torch.empty(n, p, k, dtype=torch.long)
                stats.tail_logmass = torch.empty(n, p, dtype=torch.float32)
        token_lp[rows, cols] = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        if stats.top_k is None:
            stats.full_logprobs[rows, cols] = logprobs.cpu()
        else:
            values, indices = logprobs.topk(stats.top_k, dim=-1)  # (b, c, k), descending
            tail = _tail_logmass(logprobs, indices)  # (b, c)
            stats.topk_logprobs[rows, cols] = values.cpu()
            stats.topk_indices[rows, cols] = indices.cpu()
            stats.tail_logmass[rows, cols] = tail.cpu()
    assert stats is not None  # _check_windows guarantees at least one chunk
    return stats


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------


@dataclass
class LanguageResult:
    """Measured quality of the quantized model on one language's windows.

    ``kl_divergence`` is the mean over predicted tokens of KL(P_ref || P_q) in nats; when
    ``kl_is_topk_approximation`` it is the top-k lower bound described in the module docstring.
    ``top1_agreement`` is the fraction of positions where both models' most likely token agree.
    """

    ppl_reference: float
    ppl_quantized: float
    degradation_pct: float
    kl_divergence: float
    kl_is_topk_approximation: bool
    tokens: int
    windows: int
    seq_len: int
    top_k: int | None
    top1_agreement: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "ppl_reference": self.ppl_reference,
            "ppl_quantized": self.ppl_quantized,
            "degradation_pct": self.degradation_pct,
            "kl_divergence": self.kl_divergence,
            "kl_is_topk_approximation": self.kl_is_topk_approximation,
            "kl_top_k": self.top_k,
            "top1_agreement": self.top1_agreement,
            "tokens": self.tokens,
            "windows": self.windows,
            "seq_len": self.seq_len,
        }
        out.update(self.extra)
        return out


def degradation_pct(ppl_reference: float, ppl_quantized: float) -> float:
    """(ppl_q / ppl_ref - 1) · 100: positive when the quantized model is worse."""
    return (ppl_quantized / ppl_reference - 1.0) * 100.0


def compare_pass(
    model: nn.Module,
    windows: torch.Tensor | None,
    reference: ReferenceStats,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> LanguageResult:
    """Score the quantized ``model`` on the reference's windows: perplexities, degradation, KL.

    Args:
        model: the quantized causal LM.
        windows: (n, T) tokens; must equal ``reference.windows`` (None = use those).
        reference: the output of :func:`reference_pass` on the same windows.

    The quantized model's full log-softmax is used for both its perplexity and Q(V \\ S) in the
    top-k KL; see the module docstring for the formulas.
    """
    if windows is None:
        windows = reference.windows
    windows = _check_windows(windows).cpu()
    if windows.shape != reference.windows.shape or not torch.equal(windows, reference.windows):
        raise ValueError(
            f"windows {tuple(windows.shape)} differ from the reference's {tuple(reference.windows.shape)}; "
            "pass the reference's own windows (reference.windows, or None) so both models see the same tokens."
        )
    nll_sum = torch.zeros((), dtype=torch.float64)
    kl_sum = torch.zeros((), dtype=torch.float64)
    agree = 0
    for rows, cols, lq, targets in _iter_logprobs(model, windows, batch_size, device):
        if lq.shape[-1] != reference.vocab_size:
            raise ValueError(
                f"the quantized model has a vocabulary of {lq.shape[-1]} tokens but the reference had "
                f"{reference.vocab_size}; compare models that share one tokenizer."
            )
        dev = lq.device
        nll_sum -= lq.gather(-1, targets.unsqueeze(-1)).double().sum().cpu()
        q_top1 = lq.argmax(-1)  # (b, c)
        if reference.top_k is None:
            lr = reference.full_logprobs[rows, cols].to(dev)  # (b, c, V)
            pr = lr.exp()
            kl = torch.where(pr > 0, pr * (lr - lq), torch.zeros_like(pr)).sum(-1)  # (b, c)
            r_top1 = lr.argmax(-1)
        else:
            lr_k = reference.topk_logprobs[rows, cols].to(dev)  # (b, c, k)
            idx = reference.topk_indices[rows, cols].to(dev)  # (b, c, k)
            lr_tail = reference.tail_logmass[rows, cols].to(dev)  # (b, c)
            lq_k = lq.gather(-1, idx)  # (b, c, k)
            lq_tail = _tail_logmass(lq, idx)  # (b, c)
            head = (lr_k.exp() * (lr_k - lq_k)).sum(-1)
            pr_tail = lr_tail.exp()
            tail = torch.where(pr_tail > 0, pr_tail * (lr_tail - lq_tail), torch.zeros_like(pr_tail))
            kl = head + tail
            r_top1 = idx[..., 0]
        kl_sum += kl.double().sum().cpu()
        agree += int((q_top1 == r_top1).sum())
    tokens = reference.tokens
    ppl_q = math.exp(float(nll_sum) / tokens)
    ppl_r = reference.perplexity()
    return LanguageResult(
        ppl_reference=ppl_r,
        ppl_quantized=ppl_q,
        degradation_pct=degradation_pct(ppl_r, ppl_q),
        kl_divergence=float(kl_sum) / tokens,
        kl_is_topk_approximation=reference.kl_is_topk_approximation,
        tokens=tokens,
        windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        top_k=reference.top_k,
        top1_agreement=agree / tokens,
    )


def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 1, device: str | torch.device | None = None
) -> float:
    """exp(mean NLL) of ``model`` over all predicted tokens of ``windows`` (shape (n, T))."""
    windows = _check_windows(windows)
    nll_sum = torch.zeros((), dtype=torch.float64)
    for _, _, logprobs, targets in _iter_logprobs(model, windows, batch_size, device):
        nll_sum -= logprobs.gather(-1, targets.unsqueeze(-1)).double().sum().cpu()
    return math.exp(float(nll_sum) / (windows.shape[0] * (windows.shape[1] - 1)))


# --------------------------------------------------------------------------------------------------
# Many languages, one model in memory at a time
# --------------------------------------------------------------------------------------------------


def _acquire(model_or_loader: ModelOrLoader, what: str) -> tuple[nn.Module, bool]:
    """(model, owned): ``owned`` when we called a loader and must free the model afterwards."""
    if isinstance(model_or_loader, nn.Module):
        return model_or_loader, False
    if callable(model_or_loader):
        model = model_or_loader()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"the {what} loader returned {type(model).__name__}; it must return a torch nn.Module."
            )
        return model, True
    raise TypeError(f"{what} must be an nn.Module or a zero-argument callable that loads one.")


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _progress(total: int, description: str, enabled: bool):
    from neural_quantization.reporting.progress import layer_progress

    return layer_progress(total, description, enabled=enabled, unit="window")


def reference_languages(
    reference_model: ModelOrLoader,
    tokenizer: Any,
    texts_by_lang: Mapping[str, TextSource],
    seq_len: int = 512,
    max_windows_per_language: int | None = None,
    top_k: int | None = DEFAULT_TOP_K,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    show_progress: bool = False,
) -> dict[str, ReferenceStats]:
    """Windows and reference statistics for every language, in one pass of the reference model.

    ``reference_model`` may be a module or a zero-argument loader; a loaded model is dropped (and
    the CUDA cache emptied) before returning. The result can be compared against several
    quantized models with :func:`compare_languages` without running the reference again.
    """
    if not texts_by_lang:
        raise ValueError(
            "no evaluation texts: give at least one language, e.g. {'en': '...'} or --eval-data DIR."
        )
    windows: dict[str, torch.Tensor] = {}
    for lang, text in texts_by_lang.items():
        if not _join(text).strip():
            raise ValueError(
                f"language {lang!r} has no evaluation text; add text for it or drop it from --target-languages."
            )
        try:
            windows[lang] = make_windows(tokenizer, text, seq_len, max_windows_per_language)
        except ValueError as err:
            raise ValueError(f"language {lang!r}: {err}") from err
    model, owned = _acquire(reference_model, "reference model")
    out: dict[str, ReferenceStats] = {}
    total = sum(int(w.shape[0]) for w in windows.values())
    with _progress(total, "Reference", show_progress) as bar:
        for lang, w in windows.items():
            bar.update(description=f"Reference [{lang}]")
            out[lang] = reference_pass(model, w, top_k=top_k, batch_size=batch_size, device=device)
            bar.advance(int(w.shape[0]))
    if owned:
        del model
        _release()
    return out


def compare_languages(
    quantized_model: ModelOrLoader,
    references: Mapping[str, ReferenceStats],
    batch_size: int = 1,
    device: str | torch.device | None = None,
    show_progress: bool = False,
) -> dict[str, LanguageResult]:
    """Score the quantized model (module or zero-argument loader) on each language's reference."""
    model, owned = _acquire(quantized_model, "quantized model")
    out: dict[str, LanguageResult] = {}
    total = sum(int(r.windows.shape[0]) for r in references.values())
    with _progress(total, "Quantized", show_progress) as bar:
        for lang, ref in references.items():
            bar.update(description=f"Quantized [{lang}]")
            out[lang] = compare_pass(model, None, ref, batch_size=batch_size, device=device)
            bar.advance(int(ref.windows.shape[0]))
    if owned:
        del model
        _release()
    return out


def evaluate_languages(
    reference_model: ModelOrLoader,
    quantized_model: ModelOrLoader,
    tokenizer: Any,
    texts_by_lang: Mapping[str, TextSource],
    seq_len: int = 512,
    max_windows_per_language: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    top_k: int | None = DEFAULT_TOP_K,
    show_progress: bool = False,
) -> dict[str, LanguageResult]:
    """Perplexity, degradation and KL per language: reference first for all languages, then quantized.

    Either model may be given as a module or as a zero-argument loader. With loaders only one model
    is ever in memory: the reference is loaded, run over every language, freed; then the quantized
    model is loaded and compared. See :func:`evaluate_languages_from_loaders`.

    Returns ``{lang: LanguageResult}`` in the order of ``texts_by_lang``.
    """
    references = reference_languages(
        reference_model,
        tokenizer,
        texts_by_lang,
        seq_len=seq_len,
        max_windows_per_language=max_windows_per_language,
        top_k=top_k,
        batch_size=batch_size,
        device=device,
        show_progress=show_progress,
    )
    return compare_languages(
        quantized_model, references, batch_size=batch_size, device=device, show_progress=show_progress
    )


def evaluate_languages_from_loaders(
    load_reference: Callable[[], nn.Module],
    load_quantized: Callable[[], nn.Module],
    tokenizer: Any,
    texts_by_lang: Mapping[str, TextSource],
    **kwargs: Any,
) -> dict[str, LanguageResult]:
    """:func:`evaluate_languages` for models that do not fit in memory together.

    ``load_reference()`` is called, the model run over every language and freed; only then is
    ``load_quantized()`` called. Keep no other reference to the returned models, or they cannot
    be freed. Keyword arguments are those of :func:`evaluate_languages`.
    """
    for name, fn in (("load_reference", load_reference), ("load_quantized", load_quantized)):
        if isinstance(fn, nn.Module) or not callable(fn):
            raise TypeError(
                f"{name} must be a zero-argument callable returning a model (e.g. a lambda); "
                "use evaluate_languages to pass loaded models."
            )
    return evaluate_languages(load_reference, load_quantized, tokenizer, texts_by_lang, **kwargs)
