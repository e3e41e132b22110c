"""Registers the built-in methods. Codec ids are wire ids: never renumber, only append."""
from __future__ import annotations

from kvmesh.codecs.cachegen.codec import CODEC_ID as CACHEGEN_ID
from kvmesh.codecs.cachegen.codec import make_codec as make_cachegen
from kvmesh.codecs.cachegen.levels import LEVELS
from kvmesh.codecs.lmcache import LMCacheCodec
from kvmesh.codecs.lossless import LosslessCodec
from kvmesh.codecs.quantized import Fp8Codec, UniformCodec
from kvmesh.codecs.registry import register


def _cpu_only(make_codec):
    return lambda backend: make_codec()


register("lossless", 1, _cpu_only(LosslessCodec), backends=("cpu",))
register("int8", 3, _cpu_only(lambda: UniformCodec("int8", 3, 8)), backends=("cpu",))
register("int4", 4, _cpu_only(lambda: UniformCodec("int4", 4, 4)), backends=("cpu",))
register("fp8", 5, _cpu_only(Fp8Codec), backends=("cpu",))
# LMCache's CacheGen, for comparison: registered (containers decode, benchmarks name it) but not
# listed by agents unless configured (registry.ENV_EXTRA_METHODS=lmcache-cachegen).
register("lmcache-cachegen", 6, _cpu_only(LMCacheCodec), backends=("cpu",), listed=False)

for _level in LEVELS.values():
    register("cachegen" if _level.name == "default" else f"cachegen-{_level.name}", CACHEGEN_ID,
             lambda backend, _n=_level.name, **opts: make_cachegen(_n, backend, **opts), level_id=_level.level_id,
             level_name=_level.name, options=("key_profile", "predictor", "schedule"))
