"""diffusers glue: the shortcut as a ``callback_on_step_end``, and load_student(pipe, path)."""

from .shortcut import ShortcutCallback
from .student import load_student

__all__ = ["ShortcutCallback", "load_student"]
