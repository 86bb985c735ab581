"""Placeholder: being implemented."""


def spatial_domains(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


