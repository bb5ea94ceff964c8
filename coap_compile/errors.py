"""Exceptions raised by coap_compile."""

from __future__ import annotations

__all__ = ["NonFiniteGradientError", "UnsupportedOptimizerError"]


class UnsupportedOptimizerError(TypeError):
    """The base optimizer's update cannot be rewritten into the projected (low-rank) form.

    The message names the optimizer, the offending graph node (if any) and the reason.
    """

    def __init__(self, optimizer: str, reason: str, node: str | None = None):
        self.optimizer = optimizer
        self.node = node
        self.reason = reason
        where = f" at graph node {node!r}" if node else ""
        super().__init__(f"cannot compile {optimizer} into COAP form{where}: {reason}")


class NonFiniteGradientError(FloatingPointError):
    """A gradient contained inf or NaN; the step was refused before anything was modified."""
