#!/usr/bin/env python3
"""Bytes for v2 of a question bank as a dcz delta against v1, vs full Brotli 11 and gzip -9,
when 2% of the questions change.

It generates a 1,000-question Hindi + English bundle (physics, chemistry and mathematics;
stems of 25-60 words, 2-6 options of 2-9 words, explanations of 50-140 words, in both
languages; words drawn Zipf-like from a few hundred each, with numbers, quantities and
formulas mixed in: about 2.7 MB canonical), publishes it as v1 with
``transcode.bundles.run``, then publishes three kinds of v2 with v1 as the previous version:

- **corrected**: 2% of the questions get the usual correction: a new explanation, one option
  reworded and the answer key changed;
- **rewritten**: 2% of the questions are replaced by entirely new ones (same ids): 2% of the
  text is new information, the hard case;
- **appended**: 2% more questions added at the end.

For each it reports identity, gzip -9, Brotli 11 and the dcz delta (zstd level 19, v1 as a
raw-content dictionary), and the delta as a share of full Brotli: the goal is <= 2%. Beside
it, "changed alone" is Brotli 11 of just the questions that differ from v1, compressed on their
own: what shipping only the changed questions would cost. When whole questions are new, the
delta can only be about that size (it comes out a little smaller, v1 supplying the
vocabulary). For the rewritten case it also tries other zstd levels and long-distance
matching. Every delta is decoded back and compared. Results go to ``bench/results/bundles.json``.

    .venv/bin/python bench/bundles.py [--questions 1000] [--percent 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import brotli  # noqa: E402
import zstandard  # noqa: E402

from transcode.bundles import (  # noqa: E402
    BundleSettings,
    PreviousVersion,
    dcz_window_log,
    decode_dcz,
    encode_dcz,
    run,
)

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "bundles.json"
GOAL_SHARE = 0.02

EN_WORDS = """the a of to in is and that for by with as on at from this which be are an it its if
when than then into per between about under over equal greater less constant total net initial
final average velocity acceleration force mass energy momentum displacement distance speed time
work power pressure density volume temperature heat charge current voltage resistance field
potential frequency wavelength amplitude period motion particle body block ball car train object
system surface plane incline friction gravity spring tension string pulley lens mirror ray light
wave sound electron proton nucleus atom molecule reaction acid base salt solution concentration
mole gas liquid solid bond oxidation reduction equilibrium rate catalyst enthalpy entropy
function derivative integral limit equation root matrix vector angle triangle circle radius area
perimeter probability sequence series sum product ratio value graph slope tangent find calculate
determine show what which how much many given assume neglect taking moves released thrown placed
starts stops falls rises rotates accelerates slides collides horizontal vertical uniform
circular linear maximum minimum zero positive negative correct incorrect statement option answer
because therefore hence since using applying law newton second third first conservation
principle relation formula unit dimension"""
HI_WORDS = """का की के में है हैं और से को पर एक यह वह जो कि तो भी नहीं था थी थे गया गई किया करता
करती होता होती द्रव्यमान वेग त्वरण बल ऊर्जा संवेग विस्थापन दूरी चाल समय कार्य शक्ति दाब घनत्व
आयतन ताप ऊष्मा आवेश धारा विभव प्रतिरोध क्षेत्र आवृत्ति तरंगदैर्ध्य आयाम आवर्तकाल गति कण पिंड गुटका
गेंद कार रेलगाड़ी वस्तु निकाय सतह तल घर्षण गुरुत्व स्प्रिंग तनाव डोरी घिरनी लेंस दर्पण किरण प्रकाश
तरंग ध्वनि इलेक्ट्रॉन प्रोटॉन नाभिक परमाणु अणु अभिक्रिया अम्ल क्षार लवण विलयन सांद्रता मोल गैस द्रव
ठोस बंध ऑक्सीकरण अपचयन साम्य दर उत्प्रेरक फलन अवकलज समाकलन सीमा समीकरण मूल आव्यूह सदिश कोण
त्रिभुज वृत्त त्रिज्या क्षेत्रफल परिमाप प्रायिकता अनुक्रम श्रेणी योग गुणनफल अनुपात मान ढाल ज्ञात
कीजिए गणना निर्धारित दिखाइए क्या कितना कितने दिया मान लीजिए नगण्य लेते हुए चलती छोड़ा फेंका रखा
प्रारंभ रुकती गिरती उठती घूमती फिसलती टकराती क्षैतिज ऊर्ध्वाधर एकसमान वृत्तीय रैखिक अधिकतम
न्यूनतम शून्य धनात्मक ऋणात्मक सही गलत कथन विकल्प उत्तर क्योंकि इसलिए अतः चूँकि उपयोग नियम न्यूटन
दूसरा तीसरा पहला संरक्षण सिद्धांत संबंध सूत्र मात्रक विमा प्रारंभिक अंतिम औसत"""
EN, HI = EN_WORDS.split(), HI_WORDS.split()
EN_WEIGHTS = [1 / (rank + 1) ** 0.9 for rank in range(len(EN))]
HI_WEIGHTS = [1 / (rank + 1) ** 0.9 for rank in range(len(HI))]
UNITS = ["m/s", "m/s²", "kg", "N", "J", "W", "Pa", "K", "C", "A", "V", "Ω", "Hz", "mol", "cm"]
CHAPTERS = {
    "Physics": ["Kinematics", "Laws of Motion", "Work, Energy and Power", "Gravitation", "Optics"],
    "Chemistry": ["Mole Concept", "Atomic Structure", "Chemical Bonding", "Equilibrium"],
    "Mathematics": ["Functions", "Limits and Derivatives", "Integrals", "Matrices", "Probability"],
}


def _sentence(rnd: random.Random, words: list[str], weights: list[float], n: int) -> str:
    out = rnd.choices(words, weights, k=n)
    for i in range(n):
        r = rnd.random()
        if r < 0.06:
            out[i] = str(rnd.randint(1, 999))
        elif r < 0.09:
            out[i] = f"{rnd.randint(1, 99)}.{rnd.randint(0, 9)} {rnd.choice(UNITS)}"
        elif r < 0.10:
            out[i] = f"{rnd.choice('vuastFmgk')} = {rnd.randint(2, 20)}{rnd.choice('xyt')}"
    return " ".join(out)


def _text(rnd: random.Random, words: int, sentences: int = 1) -> dict[str, str]:
    per = max(3, words // sentences)
    en = ". ".join(_sentence(rnd, EN, EN_WEIGHTS, per).capitalize() for _ in range(sentences))
    hi = "। ".join(_sentence(rnd, HI, HI_WEIGHTS, per) for _ in range(sentences))
    return {"en": en + ".", "hi": hi + "।"}


def make_question(rnd: random.Random, index: int) -> dict[str, Any]:
    subject = rnd.choice(list(CHAPTERS))
    options = rnd.choice([4, 4, 4, 4, 5, 2, 3, 6])
    return {
        "id": f"{subject[:3].lower()}-{index:05d}",
        "subject": subject,
        "chapter": rnd.choice(CHAPTERS[subject]),
        "stem": _text(rnd, rnd.randint(25, 60), rnd.randint(1, 3)),
        "options": [_text(rnd, rnd.randint(2, 9)) for _ in range(options)],
        "answer": rnd.randrange(options),
        "explanation": _text(rnd, rnd.randint(50, 140), rnd.randint(2, 6)),
    }


def make_bundle(questions: int, seed: int = 1) -> dict[str, Any]:
    rnd = random.Random(seed)  # noqa: S311 - reproducible test data
    return {
        "bundle": "JEE Main practice set",
        "questions": [make_question(rnd, i) for i in range(questions)],
    }


def change(document: dict[str, Any], kind: str, share: float, seed: int = 2) -> dict[str, Any]:
    rnd = random.Random(seed)  # noqa: S311 - reproducible test data
    new = copy.deepcopy(document)
    questions = new["questions"]
    count = round(len(questions) * share)
    if kind == "appended":
        questions += [make_question(rnd, len(questions) + i) for i in range(count)]
        return new
    for index in rnd.sample(range(len(questions)), count):
        old = questions[index]
        if kind == "rewritten":
            questions[index] = {**make_question(rnd, index), "id": old["id"]}
        else:
            option = rnd.randrange(len(old["options"]))
            old["options"][option] = _text(rnd, rnd.randint(2, 9))
            old["answer"] = option
            old["explanation"] = _text(rnd, rnd.randint(50, 140), rnd.randint(2, 6))
    return new


def publish(
    work: Path, name: str, document: dict[str, Any], settings: BundleSettings
) -> tuple[dict[str, Any], Path, float]:
    source = work / f"{name}.json"
    source.write_text(json.dumps(document, ensure_ascii=False, indent=2), encoding="utf-8")
    out = work / name
    out.mkdir()
    start = time.perf_counter()
    outputs = run(source, out, settings)
    return outputs.details, out, time.perf_counter() - start


def changed_alone_br(old: dict[str, Any], new: dict[str, Any]) -> int:
    """Brotli 11 of just the questions of ``new`` that differ from ``old`` (compact JSON): what
    shipping only the changed questions would cost."""
    before = {q["id"]: q for q in old["questions"]}
    changed = [q for q in new["questions"] if before.get(q["id"]) != q]
    body = json.dumps(changed, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return len(brotli.compress(body.encode(), quality=11))


def _ldm_delta(content: bytes, dictionary: bytes, level: int) -> int:
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(content),
        dict_size=len(dictionary),
        window_log=dcz_window_log(len(content), len(dictionary)),
        enable_ldm=1,
    )
    raw = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    compressor = zstandard.ZstdCompressor(dict_data=raw, compression_params=params)
    return 40 + len(compressor.compress(content))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--percent", type=float, default=2.0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    share = args.percent / 100

    v1_doc = make_bundle(args.questions)
    rows: list[dict[str, Any]] = []
    levels: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        v1_details, v1_out, v1_s = publish(work, "v1", v1_doc, BundleSettings(version=1))
        v1 = (v1_out / "bundle.json").read_bytes()
        previous = (PreviousVersion(1, v1),)
        for kind in ("corrected", "rewritten", "appended"):
            v2_doc = change(v1_doc, kind, share)
            details, out, seconds = publish(work, kind, v2_doc, BundleSettings(2, previous))
            v2 = (out / "bundle.json").read_bytes()
            delta = details["deltas"][0]
            assert decode_dcz((out / delta["file"]).read_bytes(), v1) == v2
            encodings = details["encodings"]
            rows.append(
                {
                    "change": kind,
                    "questions": details["questions"],
                    "identity": encodings["identity"]["bytes"],
                    "gzip9": encodings["gzip"]["bytes"],
                    "br11": encodings["br"]["bytes"],
                    "dcz": delta["bytes"],
                    "dcz_share_of_br": delta["bytes"] / encodings["br"]["bytes"],
                    "changed_alone_br11": changed_alone_br(v1_doc, v2_doc),
                    "pipeline_s": seconds,
                }
            )
            if kind == "rewritten":
                full_br = encodings["br"]["bytes"]
                for level in (3, 6, 12, 19, 22):
                    start = time.perf_counter()
                    size = len(encode_dcz(v2, v1, level))
                    elapsed = time.perf_counter() - start
                    levels.append({"zstd": f"level {level}", "dcz": size, "seconds": elapsed})
                levels.append({"zstd": "level 22 + ldm", "dcz": _ldm_delta(v2, v1, 22)})
                for entry in levels:
                    entry["share_of_br"] = entry["dcz"] / full_br

    v1_bytes = v1_details["encodings"]["identity"]["bytes"]
    print(
        f"{args.questions} questions, Hindi + English; v1 {v1_bytes:,} bytes canonical; "
        f"{args.percent:g}% of the questions changed in v2\n"
    )
    header = f"{'v2 change':<11}{'identity':>11}{'gzip -9':>10}{'br 11':>10}{'dcz v1':>9}"
    print(
        f"{header}{'dcz/br':>9}   goal <= {GOAL_SHARE:.0%}{'changed alone':>15}{'pipeline s':>12}"
    )
    for row in rows:
        verdict = "met" if row["dcz_share_of_br"] <= GOAL_SHARE else "NOT met"
        print(
            f"{row['change']:<11}{row['identity']:>11,}{row['gzip9']:>10,}{row['br11']:>10,}"
            f"{row['dcz']:>9,}{row['dcz_share_of_br']:>9.2%}   {verdict:<9}"
            f"{row['changed_alone_br11']:>13,}{row['pipeline_s']:>12.1f}"
        )
    print(
        "\nchanged alone: Brotli 11 of only the questions that differ from v1, on their own"
        "\n\nrewritten: the delta at other zstd settings"
    )
    for entry in levels:
        took = f"{entry['seconds']:.2f} s" if "seconds" in entry else ""
        print(f"  {entry['zstd']:<16}{entry['dcz']:>9,}{entry['share_of_br']:>9.2%}  {took}")

    result = {
        "questions": args.questions,
        "changed_percent": args.percent,
        "v1_bytes": v1_bytes,
        "v1_pipeline_s": v1_s,
        "rows": rows,
        "rewritten_zstd_settings": levels,
        "goal": {"dcz_share_of_br": GOAL_SHARE},
        "machine": {
            "python": platform.python_version(),
            "brotli": brotli.__version__,
            "zstd": zstandard.ZSTD_VERSION,
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
