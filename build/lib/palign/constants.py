"""Fixed vocabulary of the IPIP-NEO inventory as the paper presents it to a model."""

from __future__ import annotations

#: The Big Five traits in report order.
TRAITS: tuple[str, ...] = ("A", "C", "E", "N", "O")

#: Option letters in the order the prompt lists them; letter -> raw answer on the 1..5 scale.
OPTION_LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E")
LETTER_SCORE: dict[str, int] = {"A": 5, "B": 4, "C": 3, "D": 2, "E": 1}

#: Raw answer (1..5; 0 = missing) -> the option's text.
ANSWER_LABELS: dict[int, str] = {
    5: "Very Accurate",
    4: "Moderately Accurate",
    3: "Neither Accurate Nor Inaccurate",
    2: "Moderately Inaccurate",
    1: "Very Inaccurate",
    0: "Unknown",
}

#: Score recorded for an answer the scorer could not parse.
UNPARSED = 0
