"""Batched decoding: ``RSDEngine`` (teacher proposes, student accepts or replaces), sampling routines and
the batched KV context every model call goes through."""

from ..config import RSDConfig
from .context import BatchedContext, UnsupportedModel
from .engine import Generation, RSDEngine, TokenRecord, Trace

__all__ = ["BatchedContext", "Generation", "RSDConfig", "RSDEngine", "TokenRecord", "Trace", "UnsupportedModel"]
