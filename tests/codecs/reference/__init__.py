"""The reference implementation of every cachegen stage, in numpy and torch, one operation at a time.

It is not in the product: the CPU runs the compiled extension (codecs/cachegen/csrc) and the GPU the
Triton kernels, and the tests check both against this bit-exactly (ReferenceBackend encodes and
decodes whole containers with it). Written for clarity, not speed: FORMAT.md read as code.
"""
