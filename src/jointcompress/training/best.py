"""The best evaluated state with every technique at its target, kept in memory and restored
at the end of the run."""
from __future__ import annotations

from ..model_copy import load_model_state
from .recovery import clone


class BestState:
    def __init__(self, session):
        self.session = session
        self.state: tuple | None = None  # (model state, technique states)

    def keep(self) -> None:
        s = self.session
        self.state = (
            {k: v.detach().clone() for k, v in s.model.state_dict().items()},
            [{k: clone(v) for k, v in t.state_dict().items()} for t in s.techniques],
        )

    def forget(self) -> None:
        self.state = None

    def restore(self) -> None:
        if self.state is None:
            return
        model_state, tech_states = self.state
        load_model_state(self.session.model, model_state)
        self.session.load_technique_states(tech_states)

    def payload(self) -> dict | None:
        return None if self.state is None else {"model": self.state[0], "techniques": self.state[1]}

    def load_payload(self, best: dict | None) -> None:
        self.state = None if best is None else (best["model"], best["techniques"])
