"""Every error lcodec raises on purpose is a `LcodecError`.

The CLI turns these into one line on stderr and a non-zero exit status; any
other exception is a bug. Each subclass names one thing that went wrong, so
callers (and tests) can tell a damaged file from an unsupported one.
"""

from __future__ import annotations


class LcodecError(Exception):
    """Base class of the errors a user can cause or meet."""


class NotAnLcFileError(LcodecError):
    """The data does not start with the .lc magic bytes."""


class UnsupportedVersionError(LcodecError):
    """The file uses a format version this lcodec does not know (e.g. a newer one)."""


class CorruptFileError(LcodecError):
    """The file is truncated, has a bad CRC, or its payload does not decode."""


class ModelMismatchError(LcodecError):
    """The file names a model id or weights digest this installation does not have."""


class ImageTooLargeError(LcodecError):
    """The image (or a header's declared size) is over the decompression-bomb limit."""


class UnsupportedImageError(LcodecError):
    """The input image cannot be encoded (unreadable, empty, unsupported mode...)."""


class RateError(LcodecError):
    """The requested bitrate or size cannot be reached for this image."""


class ModelNotFrozenError(LcodecError):
    """The runtime was given a model without frozen entropy tables."""


class OutputExistsError(LcodecError):
    """The output file exists and overwriting was not allowed."""


class LcodecWarning(UserWarning):
    """Something was left out but the work was done, e.g. malformed metadata of an input image."""
