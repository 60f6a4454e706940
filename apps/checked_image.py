"""`checked_image(gr.Image(...))`: an image input whose upload of a file that is not an image is a clear
user message (the Attribution tab's wording), not Gradio's generic "Could not preprocess input
component …". The instance's `preprocess` is wrapped (a gr.Image subclass would make Gradio write a
.pyi stub next to this module at import time)."""

from __future__ import annotations

import functools

import gradio as gr
from PIL import Image, UnidentifiedImageError

NOT_AN_IMAGE = "The uploaded file is not an image PIL can read (PNG, JPEG, WebP, …)."


def checked_image(component: gr.Image) -> gr.Image:
    """`component` with its preprocess turning unreadable uploads into gr.Error(NOT_AN_IMAGE)."""
    inner = component.preprocess

    @functools.wraps(inner)
    def preprocess(payload):
        try:
            return inner(payload)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            raise gr.Error(NOT_AN_IMAGE) from None
    component.preprocess = preprocess
    return component
