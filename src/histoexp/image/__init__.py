"""Lazy access to slide images at a requested resolution."""

from ._slide import SlideImage, slide_for_library

__all__ = ["SlideImage", "slide_for_library"]
