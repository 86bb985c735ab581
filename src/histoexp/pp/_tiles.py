"""Placeholder: being implemented."""


def tile_tissue(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


