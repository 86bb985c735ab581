"""Placeholder: being implemented."""


def read_st(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


def read_visium(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


