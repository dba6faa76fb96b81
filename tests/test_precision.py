"""--dtype auto's measured choice and its cache (precision.py)."""

from __future__ import annotations

import json

import torch

from mellow_cli import loading, precision


def test_a_choice_made_among_other_candidates_is_measured_again(monkeypatch):
    """A cache written by a release that weighed other candidates must not decide for this one:
    its pick may be one this release would never make (or no longer offers)."""
    monkeypatch.setattr(precision, "_measured", {})
    calls = []
    monkeypatch.setattr(precision, "measure", lambda: calls.append(1) or (precision.EXACT, {}))
    path = loading.cache_dir() / "precision.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = {"name": "bfloat16", "store": "bfloat16", "decode": "bfloat16", "prefill": "bfloat16", "packed": False}
    path.write_text(json.dumps({precision.machine_key(): stale}))
    assert precision.named("auto", torch.device("cpu")).name == "bfloat16" and calls == []  # same candidates

    monkeypatch.setattr(precision, "_measured", {})
    monkeypatch.setattr(precision, "CANDIDATES", precision.CANDIDATES[:2])  # another release's list
    chosen = precision.named("auto", torch.device("cpu"))
    assert calls == [1] and chosen.name == "float32"
