"""Feature-extraction models: registered backbones, necks and heads composed into a RecModel."""

from shitu.models.rec_model import RecModel, build_model

__all__ = ["RecModel", "build_model"]
