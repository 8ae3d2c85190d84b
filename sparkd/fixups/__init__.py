"""Request fixups: the seed's Node request validator as declarative per-model profiles.

Each fixup is a pure function body → body in its own small module
(``tokens``, ``tools``, ``messages``, ``reasoning``); ``profiles`` says which a
model gets. The request path applies a model's ``Fixups`` before the scheduler
is asked for the model, and the context cap (``context``: it needs the engine's
token count, so it is the one fixup that is not pure) once the engine is up.
"""

from .profiles import BUILTIN_PROFILES, DEFAULT_PROFILE, Fixups, Profile, ToolMode, compile_profile

__all__ = ["BUILTIN_PROFILES", "DEFAULT_PROFILE", "Fixups", "Profile", "ToolMode", "compile_profile"]
