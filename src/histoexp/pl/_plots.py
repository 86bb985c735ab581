"""Placeholder: being implemented."""


def correlation(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


def gene_map(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


def patches(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


