"""Render each user's profile text from their attribute columns with a Python format string.

The profile is read by the same BERT as the item texts (see `LlmRecModel.encode_users`), so it should be a
short phrase in words, not a row of codes: with the default template ML-100k's ``24 | M | technician``
becomes "24-year-old male technician". Values are stringified as item metadata is (`value_to_text`), and
one recoding is built in: in a column named ``gender`` or ``sex`` the values M and F (any case) read
"male" and "female"; every other value is used as it is.
"""

from __future__ import annotations

import logging
from typing import Optional

import pandas as pd

from ..errors import DataError
from .item_text import format_rows, template_fields, value_to_text

logger = logging.getLogger(__name__)

_GENDER_COLUMNS = ("gender", "sex")
_GENDER_WORDS = {"m": "male", "f": "female"}


def _profile_value(column: str, value: str) -> str:
    if column.lower() in _GENDER_COLUMNS:
        return _GENDER_WORDS.get(value.strip().lower(), value)
    return value


def render_user_profiles(users: pd.DataFrame, template: str, source: str) -> list[Optional[str]]:
    """One profile text per user row; None where the template renders nothing (the user then has no profile).

    Whitespace is collapsed so empty fields leave no double spaces. The number of users left without a
    profile is logged as a warning.
    """
    fields = template_fields(template, "user_profile_template", "{occupation}")
    if not fields:
        raise DataError(f"data.user_profile_template {template!r} names no column, so every user would get the "
                        "same profile; refer to columns of the users file, e.g. '{age}-year-old {gender} {occupation}'.")
    missing = [name for name in fields if name not in users.columns]
    if missing:
        raise DataError(
            f"data.user_profile_template refers to column(s) {missing} that {source} does not have; available "
            f"columns: {list(map(str, users.columns))}. Change data.user_profile_template (or data.users_file)."
        )
    columns = {name: [_profile_value(name, value_to_text(value)) for value in users[name]] for name in fields}
    texts = format_rows(template, columns, len(users), "user_profile_template", source, "User")
    # A row whose fields are all empty renders only the template's literal text; that is no profile.
    profiles: list[Optional[str]] = [
        text if any(column[row].strip() for column in columns.values()) else None for row, text in enumerate(texts)
    ]
    empty = sum(profile is None for profile in profiles)
    if empty:
        logger.warning("%d user(s) in %s have every field of data.user_profile_template %r empty; they get no profile.",
                       empty, source, template)
    return profiles
