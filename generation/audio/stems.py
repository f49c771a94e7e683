"""The stems demucs splits a track into (torch-free: the request, the gateway and the engine
all name them; the separation itself is :mod:`generation.engine.stems`)."""

#: htdemucs' sources, in its order: a stems job's take ``k`` is ``STEMS[k]``.
STEMS = ("drums", "bass", "other", "vocals")
