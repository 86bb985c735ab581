"""Placeholder: being implemented."""


def her2st(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


def her2st_gene_panel(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


