"""Placeholder: being implemented."""


def extract_patches(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


def get_patches(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


PatchSource = None
