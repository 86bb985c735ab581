"""Placeholder: being implemented."""


def fit_bleep(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


def impute(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


def load_model(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


