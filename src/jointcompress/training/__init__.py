"""The built-in training loop (a client of the compression session) and its collaborators."""
from .history import History, Position
from .loop import Trainer

__all__ = ["Trainer", "History", "Position"]
