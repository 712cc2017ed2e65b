"""Test helpers for the k-quants (gguf-py 0.19 dequantizes Q4_K / Q5_K / Q6_K but cannot quantize them):
random packed super-blocks, a small numpy quantizer (round to nearest per sub-block, not llama.cpp's search),
and `requantize_gguf`, which rewrites chosen tensors of an F32 GGUF file in these types."""
from __future__ import annotations

from typing import Any

import numpy as np

# bytes per super-block of 256 weights; offsets of the float16 fields (scale, then min where the type has one)
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
_F16_FIELDS = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def random_blocks(qtype: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, k / 256 * bytes]: random bits with finite, moderate float16 scales (every scale / min / high-bit
    combination the layout allows)."""
    nb = k // 256
    raw = rng.integers(0, 256, (n, nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        f = rng.uniform(0.0, 0.01, (n, nb)).astype(np.float16)
        raw[..., off:off + 2] = f.view(np.uint8).reshape(n, nb, 2)
    return raw.reshape(n, -1)


def _six_bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative [nb, 8] -> (float scale [nb, 1], 6-bit integers [nb, 8]) with values ~= scale * integers."""
    top = values.max(axis=-1, keepdims=True)
    scale = np.where(top > 0, top / 63.0, 1.0).astype(np.float16).astype(np.float32)
    return scale, np.clip(np.rint(values / scale), 0, 63).astype(np.uint8)


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins [nb, 8] -> the 12-byte Q4_K / Q5_K field [nb, 12]."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
    return out


def quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [n, k] (k % 256 == 0) -> packed uint8 [n, k / 256 * bytes]."""
    n, k = w.shape
    x = w.reshape(-1, 256).astype(np.float32)  # super-blocks
    nb = x.shape[0]
    if qtype == "q6_k":
        g = x.reshape(nb, 16, 16)
        amax = np.abs(g).max(axis=-1)  # [nb, 16]
        sreal = amax / 31.0
        d = np.where(sreal.max(-1, keepdims=True) > 0, sreal.max(-1, keepdims=True) / 127.0, 1.0)
        d = d.astype(np.float16).astype(np.float32)
        sc = np.clip(np.rint(sreal / d), 1, 127).astype(np.int8)
        q = np.clip(np.rint(g / (d * sc)[..., None]), -32, 31).astype(np.int16) + 32  # [nb, 16, 16] in 0..63
        q = q.reshape(nb, 2, 4, 32).astype(np.uint8)  # [half, t, l]
        ql = np.zeros((nb, 2, 2, 32), dtype=np.uint8)  # [half, c, l]
        qh = np.zeros((nb, 2, 32), dtype=np.uint8)
        for t in range(4):
            ql[:, :, t & 1] |= (q[:, :, t] & 15) << (4 * (t >> 1))
            qh |= (q[:, :, t] >> 4) << (2 * t)
        out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                              d.astype(np.float16).view(np.uint8)], axis=-1)
        return out.reshape(n, -1)
    levels = 15 if qtype == "q4_k" else 31
    g = x.reshape(nb, 8, 32)
    lo = np.minimum(g.min(axis=-1), 0.0)  # w = d*sc*q - dmin*m with m >= 0: the sub-block minimum is -dmin*m
    span = g.max(axis=-1) - lo
    d, sc = _six_bit(span / levels)
    dmin, mn = _six_bit(-lo)
    step = np.maximum(d * sc, 1e-30)[..., None]
    q = np.clip(np.rint((g + (dmin * mn)[..., None]) / step), 0, levels).astype(np.uint8)  # [nb, 8, 32]
    qs = (q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)  # [nb, 4, 32]: sub-block 2j low nibbles, 2j+1 high
    parts = [d.astype(np.float16).view(np.uint8), dmin.astype(np.float16).view(np.uint8), _pack_scales(sc, mn)]
    if qtype == "q5_k":
        qh = np.zeros((nb, 32), dtype=np.uint8)
        for s in range(8):
            qh |= (q[:, s] >> 4) << s
        parts.append(qh)
    parts.append(qs.reshape(nb, 128))
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def requantize_gguf(src: str, dst: str, qtypes: dict[str, Any]) -> str:
    """Copy GGUF file src (F32 tensors) to dst with tensors `qtypes` (name -> gguf.GGMLQuantizationType) stored in
    that type: Q4_K / Q5_K / Q6_K by `quantize` above, the others by gguf.quants.quantize."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        arr = np.array(t.data, dtype=np.float32).reshape(shape)
        qtype = qtypes.get(t.name)
        if qtype is None:
            writer.add_tensor(t.name, arr)
            continue
        name = qtype.name.lower()
        packed = quantize(arr.reshape(-1, shape[-1]), name) if name in BLOCK_BYTES else gguf.quants.quantize(arr, qtype)
        writer.add_tensor(t.name, packed.reshape(*shape[:-1], -1), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
