"""Placeholder: being implemented."""


def slide_for_library(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


SlideImage = None
