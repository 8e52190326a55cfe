"""The text grammar (Slack, console) and argument validation: wrong input shows the right form."""

from __future__ import annotations

import pytest

from bot.commands import Command
from bot.core.arguments import (
    ImagineArgs,
    StyleCreateArgs,
    StyleTrainArgs,
    trigger_word,
    validate_args,
)
from bot.core.errors import UserError
from bot.core.parsing import COMMANDS, HELP, PARSE_ERROR, parse_command_text, tokenize

pytest.register_assert_rewrite("bot_fixtures")
from bot_fixtures import Rig, command  # noqa: E402

pytest_plugins = ("bot_fixtures",)


def test_positional_words_fill_parameters_in_order() -> None:
    parsed = parse_command_text("/style", "create ink inkstyle concept tiny-sdxl")
    assert parsed.name == "style create"
    assert parsed.args == {
        "name": "ink",
        "trigger": "inkstyle",
        "kind": "concept",
        "base": "tiny-sdxl",
    }


def test_key_value_options_and_quotes() -> None:
    parsed = parse_command_text(
        "/imagine", "“a cat, ink wash” inkstyle neg='blurry, text' seed=7 size=768x512 compare=yes"
    )
    assert parsed.name == "imagine"
    assert parsed.args == {
        "prompt": "a cat, ink wash inkstyle",
        "negative": "blurry, text",
        "seed": "7",
        "size": "768x512",
        "compare": "yes",
    }


def test_apostrophes_inside_words_are_not_quotes() -> None:
    parsed = parse_command_text("/imagine", "the artist's cat, don't blur")
    assert parsed.args == {"prompt": "the artist's cat, don't blur"}


def test_caption_takes_the_rest_of_the_line() -> None:
    parsed = parse_command_text("/style", "caption ink 3 a fox, in the rain")
    assert parsed.args == {"name": "ink", "number": "3", "text": "a fox, in the rain"}


def test_keyword_then_positional_skips_the_named_slot() -> None:
    parsed = parse_command_text("/style", "train ink steps=500 concept")
    assert parsed.args == {"name": "ink", "steps": "500", "preset": "concept"}


@pytest.mark.parametrize(
    ("slash", "text", "expected"),
    [
        ("/imagine", "a cat sed=4", "no option 'sed'"),
        ("/imagine", 'a "cat', "quote is not closed"),
        ("/style", "info ink extra words", "too many words"),
        ("/style", "paint ink", "/style has no 'paint' command"),
        ("/imagine", "a cat seed=1 seed=2", "seed is given twice"),
    ],
)
def test_syntax_problems_come_back_as_parse_errors(slash: str, text: str, expected: str) -> None:
    parsed = parse_command_text(slash, text)
    assert expected in parsed.args[PARSE_ERROR]


def test_empty_style_and_unknown_slash_give_help() -> None:
    assert parse_command_text("/style", "").name == HELP
    unknown = parse_command_text("/paint", "x")
    assert unknown.name == HELP and "no /paint command" in unknown.args[PARSE_ERROR]


def test_tokenize_marks_keys_and_quotes() -> None:
    tokens = tokenize('a "b c" k=v')
    assert [(t.value, t.key, t.quoted) for t in tokens] == [
        ("a", None, False),
        ("b c", None, True),
        ("v", "k", False),
    ]


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "problem"),
    [
        ("x", "2-32 characters"),
        ("a" * 33, "2-32 characters"),
        ("🎨🖌️", "only emoji"),
        ("ink style", "one word"),
        ("ink!", "letters, digits, _ or -"),
        ("2024", "at least one letter"),
    ],
)
def test_bad_triggers_are_refused_with_the_reason(word: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        trigger_word(word)


def test_good_trigger_keeps_its_spelling() -> None:
    assert trigger_word("InkStyle_2") == "InkStyle_2"
    assert trigger_word("café-ink") == "café-ink"


def test_validation_error_names_the_problem_and_shows_the_usage() -> None:
    with pytest.raises(UserError) as caught:
        validate_args("style create", {"name": "ink", "trigger": "x"})
    message = caught.value.message
    assert "2-32 characters" in message
    assert "Usage: `/style create name trigger [kind] [base]`" in message
    assert "\n" not in message


def test_missing_argument_says_which() -> None:
    with pytest.raises(UserError, match=r"Trigger is missing\. Usage: `/style create"):
        validate_args("style create", {"name": "ink"})


def test_values_are_converted_and_bounded() -> None:
    args = validate_args(
        "imagine",
        {"prompt": "a cat", "seed": "42", "steps": "20", "cfg": "6.5", "size": "768x512"},
    )
    assert isinstance(args, ImagineArgs)
    assert (args.seed, args.steps, args.cfg, args.size) == (42, 20, 6.5, (768, 512))
    assert validate_args("imagine", {"prompt": "a", "seed": "random"}).seed is None  # type: ignore[attr-defined]
    train = validate_args("style train", {"name": "Ink", "lr": "1e-4", "method": "ti"})
    assert isinstance(train, StyleTrainArgs)
    assert (train.name, train.lr, train.method) == ("ink", 1e-4, "textual_inversion")
    create = validate_args("style create", {"name": "ink", "trigger": "inkstyle"})
    assert isinstance(create, StyleCreateArgs) and create.kind == "style"


@pytest.mark.parametrize(
    ("command", "args", "problem"),
    [
        ("imagine", {"prompt": "a", "size": "500x512"}, "multiple of 8"),
        ("imagine", {"prompt": "a", "steps": "lots"}, "steps must be a whole number"),
        ("imagine", {"prompt": "a", "count": "9"}, "count must be between 1 and 8"),
        ("imagine", {"prompt": "a", "compare": "maybe"}, "compare must be yes or no"),
        ("style train", {"name": "ink", "lr": "0.5"}, "lr must be between"),
        ("style create", {"name": "ink", "trigger": "inky", "kind": "mood"}, "style or concept"),
        ("cancel", {"job": "abc"}, "job must be a whole number"),
    ],
)
def test_bad_values_explain_themselves(command: str, args: dict[str, str], problem: str) -> None:
    with pytest.raises(UserError) as caught:
        validate_args(command, args)
    assert problem.lower() in caught.value.message.lower()
    assert COMMANDS[command].usage in caught.value.message


def test_the_core_answers_a_parse_error_with_the_usage(rig: Rig) -> None:
    replies = rig.core.handle(_typed(rig, "/style", "caption ink"))
    assert len(replies) == 1 and replies[0].private
    assert "Number is missing" in replies[0].text
    assert "`/style caption name number [text]`" in replies[0].text
    replies = rig.core.handle(_typed(rig, "/imagine", "a cat sed=4"))
    assert "no option 'sed'" in replies[0].text and "`/imagine prompt" in replies[0].text
    help_reply = rig.core.handle(_typed(rig, "/style", ""))
    assert "`/style review name`" in help_reply[0].text


def _typed(rig: Rig, slash: str, text: str) -> Command:
    parsed = rig.core.text_parser(slash, text)
    return command(parsed.name, parsed.args)
