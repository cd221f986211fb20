from palign.data.papi import Item
from palign.eval.prompts import (
    NEUTRAL_SYSTEM_PROMPT,
    PromptRenderer,
    few_shot_system_prompt,
    item_question,
    item_statement,
)


class _PlainTokenizer:
    chat_template = None


def test_item_statement_is_lower_case_without_double_period():
    item = Item(1, "Worry about things.", "N", 1, "Anxiety")
    assert item_statement(item) == "worry about things"
    q = item_question(item)
    assert q.startswith('Given a statement of you: "You worry about things."\n')
    assert "(A). Very Accurate\n" in q and q.endswith("(E). Very Inaccurate\n")
    assert ".." not in q


def test_few_shot_prompt_lists_labels_and_unknown():
    items = [
        Item(1, "Worry about things.", "N", 1, ""),
        Item(2, "Make friends easily.", "E", 1, ""),
    ]
    text = few_shot_system_prompt(items, [5, 0])
    assert text.splitlines()[1:] == [
        "Worry about things.: Very Accurate",
        "Make friends easily.: Unknown",
    ]


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
