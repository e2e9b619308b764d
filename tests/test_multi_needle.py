"""The multi-needle prompt builder of the policy benchmark, on the bundled model's tokenizer."""

from __future__ import annotations

import pytest

from omnikv_runtime.eval.passkey import MULTI_NEEDLE, build_multi_needle_prompt, build_passkey_prompt


@pytest.fixture
def tokenizer(bundled):
    return bundled[1]


@pytest.mark.parametrize("needles", [2, 4])
def test_multi_needle_prompt(tokenizer, needles):
    text, asked, keys = build_multi_needle_prompt(tokenizer, 600, needles, seed=3)
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert 540 <= tokens <= 600
    assert len(set(keys)) == needles and asked in keys and all(len(k) == 5 for k in keys)
    spots = [text.index(f" is {key}. Remember it.") for key in keys]
    assert spots == sorted(spots)  # needles in order of depth, spread through the filler
    assert spots[0] > len(text) / (needles + 2) * 0.5 and spots[-1] < len(text) * 0.95
    colour = text[: text.index(f" box is {asked}.")].rsplit("the ", 1)[1]
    assert f"What is the pass key of the {colour} box?" in text
    assert build_multi_needle_prompt(tokenizer, 600, needles, seed=3) == (text, asked, keys)
    assert build_multi_needle_prompt(tokenizer, 600, needles, seed=4)[2] != keys


def test_multi_needle_rejects_a_bad_count(tokenizer):
    with pytest.raises(ValueError, match="needles"):
        build_multi_needle_prompt(tokenizer, 600, 0)
    assert MULTI_NEEDLE.count("{key}") == 2


def test_single_passkey_prompt_still_fits_its_target(tokenizer):
    text, key = build_passkey_prompt(tokenizer, 500, 0.5, seed=1)
    assert 450 <= len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 500 and key in text
