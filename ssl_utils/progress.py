"""Progress bars as text lines where a page is read statically (executed notebooks).

Every progress bar of the package (and of MONAI) is ``tqdm.auto.tqdm``: a widget in Jupyter, a
text line elsewhere. A widget's state is not text: in a committed notebook it shows, on a static
page, as a bar frozen at 0%. With ``SSL_UTILS_PROGRESS=text`` in the environment of the process
that imports ``ssl_utils`` (``make demo`` sets it for the notebooks it executes), ``tqdm.auto``
hands out tqdm's plain text bar instead, so the executed notebook holds what a terminal shows.
"""

from __future__ import annotations

import os

ENV = "SSL_UTILS_PROGRESS"


def use_text_progress() -> None:
    """Make ``tqdm.auto.tqdm`` / ``trange`` the plain text bar (``tqdm.std``) in this process.

    Modules that import ``from tqdm.auto import tqdm`` after this call get the text bar.
    """
    import tqdm.auto
    import tqdm.std

    tqdm.auto.tqdm, tqdm.auto.trange = tqdm.std.tqdm, tqdm.std.trange


def apply_environment() -> bool:
    """``use_text_progress()`` when ``SSL_UTILS_PROGRESS=text``; returns whether it did."""
    if os.environ.get(ENV, "").strip().lower() != "text":
        return False
    use_text_progress()
    return True


apply_environment()  # on import: ``ssl_utils/__init__.py`` imports this module before any other
