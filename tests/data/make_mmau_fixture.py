"""Make tests/data/mmau-fixture/: 24 MMAU-format questions about synthesized 1 s clips.

    python tests/data/make_mmau_fixture.py   # rewrites mmau-fixture.json and audio/*.flac

The JSON has the official 11 keys (see docs/bench.md), tasks sound / music / speech, the three
difficulties, several sub-categories, 2, 4 and 5 choices, one repeated choice and one `category`
stored as a one-element list, as in the real file. The audio is generated here from fixed seeds
(16 kHz mono, 16-bit FLAC), so the fixture is ours to ship: CC0. The questions are answerable
from the audio (pitch, beep count, noise or tone, ...), but a random model scores near chance.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import soundfile as sf

OUT = Path(__file__).parent / "mmau-fixture"
SR = 16000
NAMESPACE = uuid.UUID("6d656c6c-6f77-2d63-6c69-2d6d6d617521")


def tone(freq: float, seconds: float = 1.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return amp * np.sin(2 * np.pi * freq * t)


def beeps(count: int, freq: float = 1000.0) -> np.ndarray:
    out = np.zeros(SR)
    for i in range(count):
        start = int(SR * (0.05 + i * 0.3))
        out[start : start + int(SR * 0.12)] = tone(freq, 0.12)
    return out


def noise(seed: int, amp: float = 0.1) -> np.ndarray:
    return amp * np.random.default_rng(seed).standard_normal(SR)


def chord(freqs) -> np.ndarray:
    return sum(tone(f, amp=0.15) for f in freqs)


def vowel(f0: float, formants=(700, 1200)) -> np.ndarray:
    """A buzz at f0 through two formant-like peaks: a crude voiced sound."""
    t = np.arange(SR) / SR
    harmonics = np.arange(1, int(4000 / f0))
    weights = sum(np.exp(-((harmonics * f0 - f) / 150.0) ** 2) for f in formants) + 0.05
    return 0.3 * (np.sin(2 * np.pi * f0 * np.outer(t, harmonics)) @ weights) / weights.sum()


# (task, sub-category, difficulty, question, choices, answer, clip)
ITEMS = [
    ("sound", "Acoustic Source Inference", "easy", "Is the sound a steady tone or noise?",
     ["A steady tone", "Noise"], "A steady tone", tone(440)),
    ("sound", "Acoustic Source Inference", "easy", "Is the sound a steady tone or noise?",
     ["A steady tone", "Noise"], "Noise", noise(1)),
    ("sound", "Counting", "medium", "How many beeps are heard?",
     ["one", "two", "three", "three"], "three", beeps(3)),
    ("sound", "Counting", "medium", "How many beeps are heard?",
     ["one", "two", "three", "four"], "two", beeps(2)),
    ("sound", "Counting", "hard", "How many beeps are heard?",
     ["one", "two", "three", "four", "five"], "one", beeps(1)),
    ("sound", "Sound-Based Event Recognition", "medium", "What is the main sound event?",
     ["An alarm beeping", "Rain on a roof", "A dog barking", "Silence"], "Rain on a roof", noise(2, 0.05)),
    ("sound", "Sound-Based Event Recognition", "hard", "What is the main sound event?",
     ["An alarm beeping", "Rain on a roof", "A dog barking", "Silence"], "An alarm beeping", beeps(3, 2000)),
    ("sound", "Temporal Event Reasoning", "hard", "Does the sound get louder or quieter over time?",
     ["Louder", "Quieter", "It stays the same", "It stops and starts"], "Louder",
     tone(500) * np.linspace(0.05, 1.0, SR)),
    ("music", "Harmony and Chord Progressions", "medium", "Which chord quality is played?",
     ["Major", "Minor", "Diminished", "Augmented"], "Major", chord((261.6, 329.6, 392.0))),
    ("music", "Harmony and Chord Progressions", "hard", "Which chord quality is played?",
     ["Major", "Minor", "Diminished", "Augmented"], "Minor", chord((261.6, 311.1, 392.0))),
    ("music", "Instrumentation", "easy", "How many notes sound together?",
     ["One note", "Two notes", "Three notes", "Four notes"], "Three notes", chord((220.0, 277.2, 329.6))),
    ("music", "Instrumentation", "easy", "How many notes sound together?",
     ["One note", "Two notes", "Three notes", "Four notes"], "One note", tone(330)),
    ("music", "Melodic Structure Interpretation", "medium", "Does the pitch rise or fall?",
     ["It rises", "It falls"], "It rises", np.concatenate([tone(f, 0.25) for f in (262, 330, 392, 523)])),
    ("music", "Melodic Structure Interpretation", "medium", "Does the pitch rise or fall?",
     ["It rises", "It falls", "It stays the same", "It rises then falls", "It falls then rises"], "It falls",
     np.concatenate([tone(f, 0.25) for f in (523, 392, 330, 262)])),
    ("music", "Rhythm and Tempo Understanding", "hard", "Is the pulse fast or slow?",
     ["Fast, about 200 beats per minute", "Slow, about 60 beats per minute", "There is no pulse",
      "Irregular"], "Fast, about 200 beats per minute", beeps(3, 600)),
    ("music", "Musical Genre Reasoning", "hard", "Which register is the melody in?",
     ["Bass register", "Treble register", "Both", "Neither"], "Bass register", tone(82.4)),
    ("speech", "Acoustic Source Inference", "medium", "Who is more likely to produce this voice?",
     ["An adult man", "A young child", "A robot", "A bird"], "An adult man", vowel(110)),
    ("speech", "Acoustic Source Inference", "medium", "Who is more likely to produce this voice?",
     ["An adult man", "A young child", "A robot", "A bird"], "A young child", vowel(300, (1000, 1600))),
    ("speech", "Phonemic Stress Pattern Analysis", "easy", "Is the voice high or low pitched?",
     ["High", "Low"], "Low", vowel(100)),
    ("speech", "Phonemic Stress Pattern Analysis", "hard", "Is the voice high or low pitched?",
     ["High", "Low", "Both", "Neither"], "High", vowel(280)),
    ("speech", "Emotion State summarisation", "hard", "What is the speaker's energy level?",
     ["Calm", "Excited", "Asleep", "Angry"], "Calm", 0.4 * vowel(120)),
    ("speech", "Emotion State summarisation", "medium", "What is the speaker's energy level?",
     ["Calm", "Excited", "Asleep", "Angry", "Bored"], "Excited", vowel(250) * (1 + 0.8 * np.sin(np.linspace(0, 30, SR)))),
    ("speech", "Multi Speaker Role Mapping", "easy", "How many voices are heard?",
     ["One voice", "Two voices", "Three voices", "No voice"], "Two voices",
     np.concatenate([vowel(110)[: SR // 2], vowel(260)[: SR // 2]])),
    ("speech", "Conversational Fact Retrieval", "hard", "Is anyone speaking?",
     ["Yes, one person", "No, it is a pure tone", "Yes, a crowd", "No, it is silence"],
     "No, it is a pure tone", tone(700)),
]


def main() -> None:
    audio_dir = OUT / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    for old in audio_dir.glob("*.flac"):
        old.unlink()
    records = []
    for index, (task, sub, difficulty, question, choices, answer, clip) in enumerate(ITEMS):
        assert answer in choices
        ident = str(uuid.uuid5(NAMESPACE, f"item-{index}"))
        wav = np.clip(np.asarray(clip, dtype=np.float64)[:SR], -1, 1).astype(np.float32)
        sf.write(str(audio_dir / f"{ident}.flac"), wav, SR, subtype="PCM_16")
        reasoning = sub in ("Temporal Event Reasoning", "Musical Genre Reasoning", "Emotion State summarisation")
        category = "Reasoning" if reasoning else "Information Extraction"
        records.append({
            "id": ident,
            "audio_id": f"./audio/{ident}.flac",
            "question": question,
            "choices": choices,
            "answer": answer,
            "dataset": "mellow-cli synthetic",
            "task": task,
            "split": "test-mini",
            "category": [category] if index == 9 else category,  # the real file has 13 such lists
            "sub-category": sub,
            "difficulty": difficulty,
        })
    (OUT / "mmau-fixture.json").write_text(json.dumps(records, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
