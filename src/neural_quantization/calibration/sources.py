"""Where calibration text comes from: files, Python objects, or a Hugging Face dataset.

:func:`load_language_texts` turns any supported source into ``{language: [line, ...]}``. A line is
one text unit (a sentence or paragraph); empty lines are dropped. Sampling token windows from
these texts is :mod:`neural_quantization.calibration.sampling`'s job.

Accepted sources
    directory   ``{lang}.{split}.txt`` (preferred) or ``{lang}.txt`` per language, UTF-8, one text
                unit per line. With ``split="calib"`` an ``{lang}.eval.txt`` file is never read.
    file        one ``.txt`` file: keyed by its language code when its name starts with one of the
                requested languages (``fr.txt``, ``fr.calib.txt``), else by ``"text"``.
    list[str]   keyed by ``"text"``; each string may hold several lines.
    dict        ``{lang: list[str] | str}``.
    "hf:<dataset_id>[:config][:split]" or a hub dataset id ``org/name`` (not an existing path):
                loaded with the ``datasets`` library (needs network access). A config containing
                ``{lang}`` is loaded once per language (``hf:wikimedia/wikipedia:20231101.{lang}``).

A source without language labels (list, unlabelled file, dataset without ``{lang}``) gives one
bucket ``"text"``; balancing over languages then has nothing to balance.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["CalibrationDataError", "CalibrationSource", "check_language_source", "load_language_texts", "split_lines"]

CalibrationSource = str | os.PathLike | Sequence[str] | Mapping[str, str | Sequence[str]]

UNLABELLED = "text"
_HF_ROWS_PER_LANGUAGE = 4000
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class CalibrationDataError(ValueError):
    """Calibration data is missing, empty or too short; the message says how to fix it."""


def split_lines(text: str | Sequence[str]) -> list[str]:
    """Split text (or a list of texts) into non-empty, whitespace-stripped lines."""
    chunks = [text] if isinstance(text, str) else list(text)
    lines: list[str] = []
    for chunk in chunks:
        if not isinstance(chunk, str):
            raise CalibrationDataError(
                f"Calibration texts must be strings, got {type(chunk).__name__}; pass a list of str."
            )
        lines.extend(s for s in (line.strip() for line in chunk.splitlines()) if s)
    return lines


def _normalize_languages(languages: Sequence[str] | str | None) -> list[str] | None:
    if languages is None:
        return None
    if isinstance(languages, str):
        languages = [x for x in languages.replace(",", " ").split() if x]
    out = list(dict.fromkeys(languages))  # unique, order kept
    if not out:
        raise CalibrationDataError("No languages requested; name at least one, e.g. ['en'].")
    return out


def _read_lines(path: Path) -> list[str]:
    try:
        return split_lines(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"{path} is not valid UTF-8 ({e}); save it as UTF-8 text.") from e


def _check_nonempty(texts: dict[str, list[str]], what: str) -> dict[str, list[str]]:
    empty = [lang for lang, lines in texts.items() if not lines]
    if not texts or len(empty) == len(texts):
        raise CalibrationDataError(
            f"The calibration data from {what} holds no text. Give text files with one sentence or "
            "paragraph per line (e.g. ./data/en.calib.txt), or leave --calibration-data out to let "
            "the model generate its own calibration text."
        )
    if empty:
        raise CalibrationDataError(
            f"The calibration data from {what} has no text for language(s) {', '.join(empty)}. Add text "
            "for them or drop them from --target-languages."
        )
    return texts


def _from_directory(directory: Path, languages: list[str] | None, split: str) -> dict[str, list[str]]:
    if languages is None:  # every language the directory has a file for
        found = {p.name.split(".")[0] for p in directory.glob(f"*.{split}.txt")}
        found |= {p.stem for p in directory.glob("*.txt") if "." not in p.stem}
        languages = sorted(found)
        if not languages:
            raise CalibrationDataError(
                f"{directory} holds no calibration files; add {{lang}}.{split}.txt or {{lang}}.txt files "
                f"(e.g. {directory / f'en.{split}.txt'}), one text unit per line."
            )
    texts: dict[str, list[str]] = {}
    missing: list[str] = []
    for lang in languages:
        for candidate in (directory / f"{lang}.{split}.txt", directory / f"{lang}.txt"):
            if candidate.is_file():
                texts[lang] = _read_lines(candidate)
                break
        else:
            missing.append(lang)
    if missing:
        expected = ", ".join(f"{lang}.{split}.txt (or {lang}.txt)" for lang in missing)
        have = sorted(texts)
        raise CalibrationDataError(
            f"No calibration text for language(s) {', '.join(missing)} in {directory}: expected {expected}. "
            f"Add those files, or restrict --target-languages to the languages present"
            + (f" ({','.join(have)})." if have else ".")
        )
    return _check_nonempty(texts, str(directory))


def _from_file(path: Path, languages: list[str] | None) -> dict[str, list[str]]:
    code = path.name.split(".")[0]
    key = code if languages is not None and code in languages else UNLABELLED
    return _check_nonempty({key: _read_lines(path)}, str(path))


def _from_mapping(
    data: Mapping[str, str | Sequence[str]], languages: list[str] | None
) -> dict[str, list[str]]:
    wanted = list(data) if languages is None else languages
    missing = [lang for lang in wanted if lang not in data]
    if missing:
        raise CalibrationDataError(
            f"The calibration dict has no entry for language(s) {', '.join(missing)} (it has "
            f"{', '.join(map(str, data)) or 'none'}). Add texts for them or drop them from the languages."
        )
    return _check_nonempty({lang: split_lines(data[lang]) for lang in wanted}, "the calibration dict")


def _import_datasets(spec: str) -> None:
    try:
        import datasets  # noqa: F401  (optional dependency, imported only for this path)
    except ImportError:
        raise CalibrationDataError(
            f"{spec!r} is not a local file or directory, and reading it as a Hugging Face dataset needs the "
            "`datasets` package (pip install datasets). Check the path, or pass a local directory of "
            "{lang}.calib.txt files."
        ) from None


def check_hub_dataset(dataset_id: str) -> None:
    """Fail fast, with one attempt and a clear message, when hub dataset ``dataset_id`` cannot be read:
    in offline mode it must be in the local cache; otherwise one metadata request (10 s time-out)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from neural_quantization.models.loading import env_true

    offline = constants.HF_HUB_OFFLINE or env_true("HF_HUB_OFFLINE") or env_true("HF_DATASETS_OFFLINE")
    how = "pass a local file or a directory of {lang}.calib.txt files instead"
    if offline:
        if isinstance(try_to_load_from_cache(dataset_id, "README.md", repo_type="dataset"), str):
            return
        raise CalibrationDataError(
            f"{dataset_id!r} looks like a Hugging Face dataset id (read with the `datasets` package), but offline "
            f"mode is on and it is not in the local cache; unset HF_HUB_OFFLINE to download it, or {how}.")
    try:
        HfApi().dataset_info(dataset_id, timeout=10)
    except GatedRepoError:
        raise CalibrationDataError(
            f"{dataset_id} is a gated dataset: accept its terms on its hub page and log in (`hf auth login`), "
            f"or {how}.") from None
    except RepositoryNotFoundError:
        raise CalibrationDataError(
            f"The Hugging Face hub has no dataset {dataset_id!r} (read with the `datasets` package; or it is private: "
            f"log in with `hf auth login`). Check the path and the id, or {how}.") from None
    except Exception as err:  # network errors of any HTTP client: one attempt, then a clear message
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CalibrationDataError(
            f"{dataset_id!r} is not a local path, and reading it as a Hugging Face dataset (with the `datasets` "
            f"package) failed: the hub could not be reached ({first[:160]}). Check the path, or {how}.") from None


def _from_hf(spec: str, languages: list[str] | None, split: str) -> dict[str, list[str]]:
    """``<dataset_id>[:config][:split]``; the first string column (``text`` preferred) is used."""
    _import_datasets(spec)
    from datasets import load_dataset

    parts = spec.split(":")
    dataset_id = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    hf_split = parts[2] if len(parts) > 2 and parts[2] else ("train" if split == "calib" else split)

    def rows(cfg: str | None) -> list[str]:
        ds = load_dataset(dataset_id, cfg, split=hf_split, streaming=True)
        lines: list[str] = []
        column = None
        for i, row in enumerate(ds):
            if column is None:
                strings = [k for k, v in row.items() if isinstance(v, str)]
                if not strings:
                    raise CalibrationDataError(
                        f"Dataset {dataset_id!r} has no text column; pass local text files."
                    )
                column = "text" if "text" in strings else strings[0]
            lines.extend(split_lines(row[column]))
            if i + 1 >= _HF_ROWS_PER_LANGUAGE:
                break
        return lines

    if config and "{lang}" in config:
        if languages is None:
            raise CalibrationDataError(f"{spec!r} has a {{lang}} placeholder; name the languages to load.")
        texts = {lang: rows(config.replace("{lang}", lang)) for lang in languages}
    else:
        texts = {UNLABELLED: rows(config)}
    return _check_nonempty(texts, f"dataset {dataset_id}")


def load_language_texts(
    source: CalibrationSource,
    languages: Sequence[str] | str | None,
    split: str = "calib",
) -> dict[str, list[str]]:
    """Read calibration text from ``source`` as ``{language: [non-empty line, ...]}``.

    ``languages`` lists the languages wanted (a list or "en,fr"); ``None`` takes whatever the source
    holds. Every requested language must have text, else :class:`CalibrationDataError` names the
    missing files and how to fix it. ``split`` picks ``{lang}.{split}.txt`` files in a directory.

    Example: a directory with ``en.calib.txt`` (2 lines) and ``fr.txt`` (3 lines) and
    ``languages=["en", "fr"]`` gives ``{"en": [2 lines], "fr": [3 lines]}``.
    """
    langs = _normalize_languages(languages)
    if isinstance(source, Mapping):
        return _from_mapping(source, langs)
    if isinstance(source, (list, tuple)):
        return _check_nonempty({UNLABELLED: split_lines(source)}, "the list of texts")
    if not isinstance(source, (str, os.PathLike)):
        raise CalibrationDataError(
            f"Unsupported calibration source of type {type(source).__name__}; pass a directory, a text file, "
            "a list of strings, a dict {language: texts}, or 'hf:<dataset_id>'."
        )
    name = os.fspath(source)
    spec = _dataset_spec(name)
    if spec is not None:
        return _from_hf(spec, langs, split)
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_directory(path, langs, split)
    if path.is_file():
        return _from_file(path, langs)
    raise CalibrationDataError(
        f"No such file or directory: {name!r} (looked in {Path.cwd()}). Pass a directory of {{lang}}.{split}.txt "
        "files, a text file, 'hf:<dataset_id>[:config][:split]' for a Hugging Face dataset, or leave it out to "
        "let the model generate its own calibration text."
    )


def _dataset_spec(name: str) -> str | None:
    """The Hugging Face dataset a source string names (``hf:<spec>``, or an ``org/name`` that is not a
    local path and whose first part is not a local directory, which would make it a mistyped path)."""
    if name.startswith("hf:"):
        return name[3:]
    if _HUB_ID.match(name) and not Path(name).expanduser().exists() and not Path(name.split("/")[0]).is_dir():
        return name
    return None


def check_language_source(source: CalibrationSource, languages: Sequence[str] | str | None, split: str = "calib") -> None:
    """Fail now, before any model loads, when ``source`` cannot give text for ``languages``.

    Local files and Python objects are read and checked as :func:`load_language_texts` does; a
    Hugging Face dataset needs the ``datasets`` package and must be reachable
    (:func:`check_hub_dataset`).
    """
    if isinstance(source, (str, os.PathLike)) and _dataset_spec(os.fspath(source)) is not None:
        _import_datasets(os.fspath(source))
        check_hub_dataset(os.fspath(source).split(":")[0])
        return
    load_language_texts(source, languages, split)
