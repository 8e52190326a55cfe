"""The one set of prompt rules the bot and the runner share (storage.prompt_rules)."""

from __future__ import annotations

import pytest

from storage.prompt_rules import (
    LoraTag,
    PromptError,
    find_trigger,
    insert_trigger,
    lora_tags,
    strip_lora_tags,
    tag_names,
    without_trigger,
)


def test_lora_tags_read_as_a1111_writes_them_and_as_people_type_them() -> None:
    tags = lora_tags("<lora:ink:0.8> a cat < LORA : Neon > <lora:sketch:>")
    assert [(t.name, t.weight, t.start) for t in tags] == [
        ("ink", 0.8, 0),
        ("Neon", 1.0, 21),
        ("sketch", 1.0, 37),
    ]
    assert strip_lora_tags("<lora:ink:0.8> a cat < LORA : Neon > , x") == "a cat, x"


def test_unreadable_tags_say_what_to_fix() -> None:
    # More cases, through the bot and the runner: tests/test_core_jobs, tests/test_generation.
    with pytest.raises(PromptError, match="is not a LoRA tag"):
        lora_tags("<lora::1>")
    with pytest.raises(PromptError, match="use a weight between -4 and 4"):
        lora_tags("<lora:a:nan>")


def test_a_tag_names_a_style_by_name_or_trigger_in_any_case() -> None:
    tag = LoraTag("<lora:INKSTYLE>", "INKSTYLE", 1.0, 0)
    assert tag_names(tag, "ink", "InkStyle") and tag_names(tag, "inkstyle", None)
    assert not tag_names(tag, "ink", "sketchy")


def test_a_trigger_is_a_whole_word_in_any_case() -> None:
    assert find_trigger("ink-wash", "an INK-WASH cat") == 3
    assert find_trigger("ink", "an ink-wash cat") is None
    assert find_trigger("ink", "inks, _ink, ink2") is None
    assert find_trigger("", "anything") is None
    assert insert_trigger("an Ink-Wash cat", "ink-wash") == "an Ink-Wash cat"
    assert without_trigger("ZXQ, a zxq-like cat", "zxq") == "a zxq-like cat"
