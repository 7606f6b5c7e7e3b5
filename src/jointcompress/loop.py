"""The built-in loop now lives in jointcompress.training (a client of jointcompress.session);
these names stay importable from here."""
from .session.teacher import TeacherCache
from .training.history import History
from .training.loop import Trainer

__all__ = ["Trainer", "History", "TeacherCache"]
