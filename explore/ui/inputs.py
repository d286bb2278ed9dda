"""Form components whose values from any client (browser, API, a fuzzer) are checked before use.

Gradio's own checks pass a string or NaN through to a comparison that fails with a Python TypeError, round
2.5 to 2 without a word, and report bad choices without naming the field. These drop-in subclasses refuse
such values with a message that names the field (its label) and the accepted range or choices.
"""
from __future__ import annotations

import math
import re

import gradio as gr


class _Checked:
    """Mixin for Gradio input components: field-named errors, numbers checked before Gradio's preprocess."""

    numeric = False

    def _field(self) -> str:
        return str(getattr(self, "label", None) or "value")

    def _range(self) -> str:
        low, high = getattr(self, "minimum", None), getattr(self, "maximum", None)
        whole = "a whole number" if getattr(self, "precision", None) == 0 else "a number"
        if low is None and high is None:
            return whole
        return f"{whole} in [{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"

    def _check_number(self, payload):
        field, accepted = self._field(), self._range()
        if isinstance(payload, bool) or not isinstance(payload, (int, float)):
            raise gr.Error(f"{field}: {payload!r:.60} is not {accepted}")
        low, high = getattr(self, "minimum", None), getattr(self, "maximum", None)
        if isinstance(payload, float) and not math.isfinite(payload) or low is not None and payload < low \
                or high is not None and payload > high:
            raise gr.Error(f"{field}: {payload!r} is outside the accepted range; accepted: {accepted}")
        if getattr(self, "precision", None) == 0 and not float(payload).is_integer():
            raise gr.Error(f"{field}: {payload!r} is not {accepted}")  # never rounded silently

    def preprocess(self, payload):
        if self.numeric and (payload is not None or isinstance(self, gr.Slider)):
            self._check_number(payload)
        try:
            return super().preprocess(payload)
        except gr.Error as err:
            raise gr.Error(f"{self._field()}: {err.message}") from None


class Slider(_Checked, gr.Slider):
    numeric = True

    def get_block_name(self) -> str:
        return "slider"


class Number(_Checked, gr.Number):
    numeric = True

    def get_block_name(self) -> str:
        return "number"


class Dropdown(_Checked, gr.Dropdown):
    def get_block_name(self) -> str:
        return "dropdown"


class Radio(_Checked, gr.Radio):
    def get_block_name(self) -> str:
        return "radio"


class Image(_Checked, gr.Image):
    """An image upload whose unreadable files (text, truncated, bombs) are refused by name, not by traceback."""

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as err:  # noqa: BLE001 - Pillow's many exception types for a file it cannot open
            reason = re.sub(r"'/[^']*'", "", " ".join(str(err).split()))[:120] or type(err).__name__  # no paths
            raise gr.Error(f"{self._field()}: not an image this app can read ({reason})") from None

    def get_block_name(self) -> str:
        return "image"
