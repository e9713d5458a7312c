"""Abstract Textual classes: the metaclass that lets a screen or widget declare `abc.abstractmethod` hooks.

Textual's screens and widgets have a metaclass of their own, so `abc.ABC` cannot simply be mixed in; a class
made with `Abstract` refuses to be instantiated until every hook is overridden, like any ABC.
"""

from __future__ import annotations

import abc

from textual.widget import Widget


class Abstract(type(Widget), abc.ABCMeta):  # type: ignore[misc]
    """Textual's metaclass and ABCMeta together."""
