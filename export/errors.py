"""Errors of export: part of the toolkit's one error tree (`mrl.runtime.errors.MrlError`), raised only here."""

from __future__ import annotations

from mrl.runtime.errors import MrlError


class ExportError(MrlError):
    """An export that cannot proceed (unreadable model, unwritable output, ...)."""


class ParityError(ExportError):
    """An exported graph whose output does not match the reference model closely enough."""
