"""lcodec: a learned image codec that hits the file size you ask for.

>>> import lcodec
>>> data = lcodec.encode(Image.open("photo.png"), bpp=0.5)   # doctest: +SKIP
>>> lcodec.decode(data).save("photo-decoded.png")             # doctest: +SKIP

Importing lcodec registers the .lc format with Pillow (``Image.open("x.lc")``)
and does not import torch: the functions that code pixels import it when first
called, so reading headers (`read_header`, ``lcodec info``) stays fast.
"""

from importlib.metadata import PackageNotFoundError, version

from . import errors, pillow_plugin
from .api import DecodedFile, EncodedFile, ModelInfo, decode, decode_file, encode, encode_file, model_info, read_header

try:
    __version__ = version("lcodec")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

pillow_plugin.register()

__all__ = [
    "DecodedFile",
    "EncodedFile",
    "ModelInfo",
    "__version__",
    "decode",
    "decode_file",
    "encode",
    "encode_file",
    "errors",
    "model_info",
    "read_header",
]
