"""Passkey retrieval: prompts of the asked length with the key at the asked depth; `ember eval passkey` runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ember.bench.passkey import passkey_prompt
from ember.models.loader import load_model


def test_prompt_length_and_depth(tiny_llama3: Path) -> None:
    tok = load_model(str(tiny_llama3)).tokenizer
    for length in (300, 900):
        for depth in (0.0, 0.5, 1.0):
            ids = passkey_prompt(tok, length, depth, "48213")
            assert abs(len(ids) - length) < 0.1 * length
            text = tok.decode(ids)
            needle = text.index("The pass key is 48213")
            before, total = text[:needle].count("The grass is green"), text.count("The grass is green")
            assert total >= 3 and abs(before - depth * total) <= 0.5 + 1e-9, (depth, before, total)
            assert text.endswith("What is the pass key? The pass key is")


def test_cli_runs_a_mode_past_the_window(tiny_llama3: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ember.cli", "eval", "passkey", str(tiny_llama3), "--long-context",
                           "streaming", "--attention-window", "64", "--lengths", "200,400", "--depths", "0,1",
                           "--trials", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["attention_window"] == 64 and out["attention_sinks"] == 4
    assert {(c["length"], c["depth"]) for c in out["cells"]} == {(200, 0), (200, 1), (400, 0), (400, 1)}
    assert all(c["trials"] == 2 and 0 <= c["accuracy"] <= 1 for c in out["cells"])
