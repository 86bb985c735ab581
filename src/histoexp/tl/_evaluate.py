"""Placeholder: being implemented."""


def evaluate(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


