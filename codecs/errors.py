"""The one error type the codecs raise for bad input and for corrupt containers."""


class CodecError(ValueError):
    """Raised for input a codec cannot encode (wrong shape/dtype, inf/NaN) and for any container
    that is corrupt, truncated, or was written by another codec: decode never returns garbage."""
