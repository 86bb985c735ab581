"""Placeholder: being implemented."""


def from_spatialdata(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


def to_spatialdata(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


