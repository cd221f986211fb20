from palign.data.papi import Item
from palign.eval.prompts import (
    NEUTRAL_SYSTEM_PROMPT,
    PromptRenderer,
    few_shot_system_prompt,
    item_question,
    item_statement,
    reference_contrastive_question,
)


class _PlainTokenizer:
    chat_template = None


#: The reference code's question template (zhu-minjun/PAlign main.py), written out here.
REFERENCE_TEMPLATE = (
    'Given a statement of you: "You {}."\nPlease choose from the following options to identify '
    "how accurately this statement describes you.\nOptions:\n(A). Very Accurate\n"
    "(B). Moderately Accurate\n(C). Neither Accurate Nor Inaccurate\n"
    "(D). Moderately Inaccurate\n(E). Very Inaccurate\n"
)
LABELS = {
    5: "Very Accurate",
    4: "Moderately Accurate",
    3: "Neither Accurate Nor Inaccurate",
    2: "Moderately Inaccurate",
    1: "Very Inaccurate",
    0: "Unknown",
}


def test_item_statement_is_lower_case_without_double_period():
    item = Item(1, "Worry about things.", "N", 1, "Anxiety")
    assert item_statement(item) == "worry about things"
    q = item_question(item)
    assert q == REFERENCE_TEMPLATE.format("worry about things")
    assert ".." not in q


def test_paper_prompts_follow_the_reference_format_rules():
    """protocol=paper: test questions format the lower-cased statement as printed (its period
    doubled); contrastive questions the statement as printed, not lower-cased."""
    item = Item(1, "Worry about things.", "N", 1, "Anxiety")
    assert item_question(item, strip_period=False) == REFERENCE_TEMPLATE.format(
        "worry about things."
    )
    assert reference_contrastive_question(item) == REFERENCE_TEMPLATE.format("Worry about things.")


def test_few_shot_prompt_is_the_reference_format():
    """The preamble, then ``text:label`` per item, all joined by ';' (stored value 0 shows as
    'Unknown'), as the reference's PAS builds its system prompt."""
    items = [
        Item(1, "Worry about things.", "N", 1, ""),
        Item(2, "Make friends easily.", "E", 1, ""),
        Item(3, "Have a vivid imagination.", "O", 1, ""),
    ]
    answers = [5, 0, 2]
    expected = (
        "Here are some of your behaviors and your level of recognition towards them;"
        + ";".join(f"{it.text}:{LABELS[a]}" for it, a in zip(items, answers))
    )
    assert few_shot_system_prompt(items, answers) == expected
    assert few_shot_system_prompt(items, answers).endswith(
        "Make friends easily.:Unknown;Have a vivid imagination.:Moderately Inaccurate"
    )


def test_chat_template_rendering(tiny):
    renderer = PromptRenderer(tiny.tokenizer)
    text = renderer.render(NEUTRAL_SYSTEM_PROMPT, "Q?", "Option (")
    assert text == (
        f"<|im_start|>system\n{NEUTRAL_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\nOption ("
    )
    assert renderer.add_special_tokens is False


def test_plain_text_fallback():
    renderer = PromptRenderer(_PlainTokenizer())
    assert renderer.render("S", "Q?", "Option (") == "System: S\n\nUser: Q?\n\nAssistant: Option ("
    assert renderer.add_special_tokens is True
