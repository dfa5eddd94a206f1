"""MkDocs hook: the docstrings' Sphinx roles (``:func:`add```) rendered as plain code.

mkdocstrings renders the docstrings as Markdown, which knows no roles, so ``:func:`add```
would show as ":func:" followed by ``add``. This drops the role and keeps the code.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|meth|attr|data|exc|mod|obj):(?=<code>)")


def on_page_content(html: str, **_kwargs: Any) -> str:
    return _ROLE.sub("", html)
