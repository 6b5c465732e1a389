"""Rebuild assets/kslottery_smoke_sp.model: a 400-piece SentencePiece BPE model (byte fallback, so a newline is the
piece <0x0A>; pad id 3) trained on the built-in English/German smoke text and the plain prompt template."""

import json
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
lines = []
for split in ("train", "valid", "test"):
    for line in (ROOT / "fairseq2_kslottery/data/builtin/smoke_en_de" / f"{split}.jsonl").open(encoding="utf-8"):
        pair = json.loads(line)
        lines += [pair["src"], pair["tgt"]]
        # The whole plain-template prompt, so that the template's words become few pieces.
        lines.append(f"Translate the following sentence from English to German.\nEnglish: {pair['src']}\nGerman:")
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines * 5),
    model_prefix=str(ROOT / "assets/kslottery_smoke_sp"),
    vocab_size=400,
    model_type="bpe",
    character_coverage=1.0,
    byte_fallback=True,
    normalization_rule_name="identity",
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
    hard_vocab_limit=False,
    minloglevel=2,
)
(ROOT / "assets/kslottery_smoke_sp.vocab").unlink()
