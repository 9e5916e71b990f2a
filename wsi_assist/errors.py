"""Exceptions with messages fit for one line of CLI output, and :func:`in_words` for
exceptions that are not ours."""

from __future__ import annotations


class WsiAssistError(Exception):
    """Base class: the message alone explains the problem to a user."""


class SlideError(WsiAssistError):
    """A slide cannot be opened, read or measured."""


class ConfigError(WsiAssistError):
    """A configuration value is missing or invalid; the message names the key path."""


class ModelError(WsiAssistError):
    """A model file is missing, truncated or does not match what was expected."""


class StageSkipped(WsiAssistError):
    """A stage has nothing to do because its model is not configured; the message says
    how to enable it. Recorded as "not run" for the slide, not as a failure."""


#: Decoders by the name of imagecodecs' exception class, less "Error" (Jpeg8Error: JPEG).
_CODECS = {"jpeg8": "JPEG", "jpeg": "JPEG", "ljpeg": "lossless JPEG", "jpegsof3": "JPEG",
           "jpeg2k": "JPEG 2000", "jpegxl": "JPEG XL", "jpegxr": "JPEG XR",
           "jpegls": "JPEG-LS", "deflate": "Deflate", "zlib": "zlib", "lzw": "LZW",
           "webp": "WebP", "zstd": "Zstandard", "lzma": "LZMA", "packbits": "PackBits",
           "png": "PNG", "avif": "AVIF", "lerc": "LERC", "delta": "delta predictor"}


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message ("" when it has none)."""
    text = str(e).strip().splitlines()
    return text[0].strip() if text else ""


def in_words(e: BaseException, internal: str = "damaged or inconsistent data") -> str:
    """What went wrong, for a user, never a Python exception class name: our own
    messages and tifffile's as they are, the decoder for imagecodecs' errors, the
    system's reason for an OSError, and ``internal`` for errors such as IndexError or
    ZeroDivisionError that libraries raise on malformed data (their traceback goes to
    the log; their message means nothing to a user)."""
    msg = first_line(e)
    name = type(e).__name__
    module = type(e).__module__ or ""
    if isinstance(e, WsiAssistError):
        return msg or internal
    if module.startswith("imagecodecs"):
        key = name.removesuffix("Error")
        codec = _CODECS.get(key.lower(), key)
        return f"{codec} data is corrupt: {msg}" if msg and msg != name else \
            f"{codec} data is corrupt"
    if module.startswith("tifffile") and msg:
        return msg
    if isinstance(e, OSError):
        return f"the system reported: {(e.strerror or msg or 'input/output error').rstrip('.')}"
    if isinstance(e, NotImplementedError):
        return f"a layout the TIFF reader does not support ({msg})" if msg else \
            "a layout the TIFF reader does not support"
    if isinstance(e, MemoryError):
        return "not enough memory"
    return internal
