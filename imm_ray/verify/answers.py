"""Final-answer extraction from model completions and numeric answer comparison.

Everything here is pure string/number handling with no model or framework dependency, so the
same functions normalise gold answers at load time and predicted answers at verify time.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation, localcontext

__all__ = [
    "extract_answer",
    "parse_number",
    "normalize_number",
    "normalize_answer",
    "answers_match",
]

# A number token in free text: optional sign, thousands groups or plain digits, optional
# decimals, optional "/denominator". Not preceded by a word character, '.' or '/', so that
# "5-3" yields 5 and 3 (not -3), "x2" yields nothing and "12/25/2020" is not read as 25/2020.
_TEXT_NUMBER = re.compile(
    r"(?<![\w./])"
    r"(-\s?)?"
    r"((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?(\d+(?:\.\d+)?)(?![\d/]))?"
)
_LATEX_FRAC = re.compile(r"^(-?)\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}$")
_LATEX_FRAC_SHORT = re.compile(r"^(-?)\\[dt]?frac\s*(\d)(\d)$")
_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_GROUPED_NUMBER = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\b\s*:?", re.IGNORECASE)
_HASHES = re.compile(r"####")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_LHS_ASSIGN = re.compile(r"^[A-Za-z]\w*\s*=\s*")
_DECORATIONS = (
    ("\u2212", "-"),  # unicode minus
    ("{,}", ","),  # LaTeX thousands separator
    ("\\!", ""),
    ("\\,", ""),
    ("\\$", ""),
    ("\\%", ""),
    ("$", ""),
    ("%", ""),
    ("**", ""),
    ("\\left", ""),
    ("\\right", ""),
)
_TEXT_WRAPPER = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")


def _strip_decorations(s: str) -> str:
    s = s.strip()
    for old, new in _DECORATIONS:
        s = s.replace(old, new)
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = s.strip().rstrip(".").strip()
    # Outer braces or parentheses around a whole number: "{12}", "(12)".
    while len(s) >= 2 and s[0] + s[-1] in ("{}", "()"):
        s = s[1:-1].strip()
    s = re.sub(r"\s*/\s*", "/", s)
    return re.sub(r"^([+-])\s+", r"\1", s)


def _to_decimal(s: str) -> Decimal | None:
    """Parse one plain or grouped decimal literal (no fractions) into a Decimal."""
    if _GROUPED_NUMBER.match(s):
        s = s.replace(",", "")
    if not _PLAIN_NUMBER.match(s):
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _parse_decimal(s: str) -> Decimal | None:
    """Parse a number-like string (commas, $, %, fractions, LaTeX \\frac) into a Decimal."""
    if not isinstance(s, str):
        return None
    s = _strip_decorations(s)
    if not s:
        return None
    frac = _LATEX_FRAC.match(s) or _LATEX_FRAC_SHORT.match(s)
    if frac:
        sign, num_s, den_s = frac.groups()
        num, den = _parse_decimal(num_s), _parse_decimal(den_s)
        if num is None or den is None or den == 0:
            return None
        with localcontext() as ctx:
            ctx.prec = 17
            value = num / den
        return -value if sign else value
    if s.count("/") == 1:
        num_s, den_s = s.split("/")
        negative = num_s.startswith("-")
        num, den = _to_decimal(num_s.lstrip("-")), _to_decimal(den_s)
        if num is None or den is None or den == 0 or den_s.startswith(("-", "+")):
            return None
        with localcontext() as ctx:
            ctx.prec = 17
            value = num / den
        return -value if negative else value
    return _to_decimal(s)


def _format_decimal(value: Decimal) -> str:
    """Canonical text for a number: no exponent, no trailing zeros, no '-0'."""
    if value == 0:
        return "0"
    with localcontext() as ctx:
        ctx.prec = max(28, len(value.as_tuple().digits))  # never round while normalising
        return format(value.normalize(), "f")


def parse_number(s: str) -> float | None:
    """Parse a number written as text ("1,234.50", "$5", "50%", "-3/4", "\\frac{1}{2}").

    Returns None when the whole string (after removing currency/percent/markdown decorations)
    is not a single number.
    """
    value = _parse_decimal(s)
    return None if value is None else float(value)


def normalize_number(s: str | int | float) -> str | None:
    """Canonical numeric string: "1,234" -> "1234", 5.0 -> "5", "3.50" -> "3.5"; None if not numeric."""
    if isinstance(s, bool):
        return None
    if isinstance(s, int):
        return str(s)
    if isinstance(s, float):
        if not math.isfinite(s):
            return None
        return _format_decimal(Decimal(repr(s)))
    value = _parse_decimal(s)
    return None if value is None else _format_decimal(value)


def normalize_answer(s: str) -> str:
    """Normalised form of any answer: the canonical number when numeric, else trimmed text."""
    number = normalize_number(s)
    if number is not None:
        return number
    return _strip_decorations(s).casefold()


def _first_number(text: str) -> str | None:
    """The first number token in text, normalised; None if there is none."""
    match = _TEXT_NUMBER.search(_clean_for_scan(text))
    return _token_to_number(match) if match else None


def _last_number(text: str) -> str | None:
    matches = list(_TEXT_NUMBER.finditer(_clean_for_scan(text)))
    return _token_to_number(matches[-1]) if matches else None


def _clean_for_scan(text: str) -> str:
    text = text.replace("\u2212", "-").replace("{,}", ",")
    # \frac{a}{b} -> a/b so that scanning sees the fraction as one token.
    return re.sub(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*([\d.,]+)\s*\}", r"\1/\2", text)


def _token_to_number(match: re.Match[str]) -> str | None:
    sign, body, denominator = match.groups()
    token = ("-" if sign else "") + body + (f"/{denominator}" if denominator else "")
    return normalize_number(token)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} in text, with nested braces balanced."""
    contents = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    contents.append(text[start:i])
                    break
    return contents


def _boxed_answer(content: str) -> str | None:
    content = content.strip()
    if not content:
        return None
    number = normalize_number(content)
    if number is None:
        number = normalize_number(_LHS_ASSIGN.sub("", content))
    return number if number is not None else content


def extract_answer(text: str) -> str | None:
    """Extract the final answer from a completion.

    Priority: the last "The answer is[:] N" whose line holds a number, then the last "#### N",
    then the last \\boxed{...} (nested braces allowed; non-numeric content is returned as written),
    then the last number in the text. Numeric answers come back normalised ("1234", "0.75").
    Returns None when nothing numeric (or boxed) is found.
    """
    if not text:
        return None
    for match in reversed(list(_ANSWER_IS.finditer(text))):
        number = _first_number(text[match.end():].lstrip().split("\n", 1)[0])
        if number is not None:
            return number
    for match in reversed(list(_HASHES.finditer(text))):
        number = _first_number(text[match.end():].lstrip().split("\n", 1)[0])
        if number is not None:
            return number
    for content in reversed(_boxed_contents(text)):
        answer = _boxed_answer(content)
        if answer is not None:
            return answer
    return _last_number(text)


def answers_match(
    pred: str | None, gold: str, rel_tol: float = 1e-6, abs_tol: float = 1e-6
) -> bool:
    """True when pred equals gold: numerically within tolerance if both parse, else as text."""
    if pred is None or gold is None:
        return False
    pred_value, gold_value = parse_number(str(pred)), parse_number(str(gold))
    if pred_value is not None and gold_value is not None:
        return math.isclose(pred_value, gold_value, rel_tol=rel_tol, abs_tol=abs_tol)
    if pred_value is not None or gold_value is not None:
        return False
    return normalize_answer(str(pred)) == normalize_answer(str(gold))
