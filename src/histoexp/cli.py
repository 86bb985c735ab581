"""Placeholder: being implemented."""


def main(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


