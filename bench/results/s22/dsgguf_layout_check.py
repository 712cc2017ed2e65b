"""Manual check (not a test: needs llama.cpp's converter): tests/model/deepseek_gguf.py writes what llama.cpp's own
convert_hf_to_gguf.py writes for tiny random DeepSeek models (same tensor names, types, shapes and bytes, same
metadata keys and values), and tokenmill loads the converter's F32 and Q8_0 files to transformers' logits.

  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/dsgguf_sdist && tar xzf ...
  PYTHONPATH=. .venv/bin/python bench/results/s22/dsgguf_layout_check.py \
      /tmp/dsgguf_sdist/llama_cpp_python-0.3.36/vendor/llama.cpp /tmp/dsgguf_check
The converter runs in a subprocess with its own gguf-py; its set_vocab is skipped (the tiny models have no
tokenizer)."""
import os
import subprocess
import sys

import numpy as np
import torch

CONVERT = """
import sys
sys.path.insert(0, {l!r}); sys.path.insert(1, {l!r} + "/gguf-py")
import conversion.deepseek as d
d.DeepseekV2Model.set_vocab = lambda self: None
import convert_hf_to_gguf as c
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
c.main()
"""
SKIP_KEYS = ("GGUF.", "general.name", "general.type", "general.size_label", "general.quantization_version",
             "general.file_type")


def fields(reader):
    out = {}
    for k, f in reader.fields.items():
        if not k.startswith(SKIP_KEYS):
            v = f.contents()
            out[k] = round(v, 6) if isinstance(v, float) else v
    return out


def main(llama_cpp: str, work: str) -> None:
    import gguf

    from tests.model.deepseek_gguf import save_deepseek2_gguf
    from tests.model.test_moe_loading import IDS, _logits
    from tests.model.tiny_models import DEEPSEEK_ARCHS, build_tiny_model
    from tokenmill.model.loader import load_hf_config, load_model, resolve_model_source

    os.makedirs(work, exist_ok=True)
    script = os.path.join(work, "convert.py")
    with open(script, "w") as f:
        f.write(CONVERT.format(l=llama_cpp))
    for arch in DEEPSEEK_ARCHS:
        # a released V3 config.json says scoring_func sigmoid (transformers' config object drops it)
        extra = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"} if arch == "deepseek_v3" else {}
        hf = build_tiny_model(arch, **extra)
        folder = os.path.join(work, arch)
        hf.save_pretrained(folder)
        theirs = {}
        for outtype in ("f32", "q8_0"):
            theirs[outtype] = os.path.join(work, f"{arch}.llamacpp.{outtype}.gguf")
            subprocess.run([sys.executable, script, folder, "--outtype", outtype, "--outfile", theirs[outtype]],
                           check=True, capture_output=True)
        ours = save_deepseek2_gguf(build_tiny_model(arch), os.path.join(work, f"{arch}.ours.gguf"))
        a, b = gguf.GGUFReader(theirs["f32"]), gguf.GGUFReader(ours)
        fa, fb = fields(a), fields(b)
        assert fa == fb, {k: (fa.get(k), fb.get(k)) for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}
        ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
        assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
        for name, t in ta.items():
            u = tb[name]
            assert t.tensor_type == u.tensor_type and list(t.shape) == list(u.shape), name
            assert np.array_equal(np.asarray(t.data), np.asarray(u.data)), name
        print(f"{arch}: converter F32 file == tests writer: {len(fa)} keys, {len(ta)} tensors, same bytes")
        with torch.no_grad():
            ref = hf(torch.tensor([IDS])).logits[0]
        for outtype, path in theirs.items():
            src = resolve_model_source(path)
            cfg = load_hf_config(src)
            got = {q: _logits(load_model(src, cfg, torch.float32, "cpu", quantization=q, gemm_dtype="float32"))
                   for q in ("auto", "none")}
            types = sorted({t.tensor_type.name for t in gguf.GGUFReader(path).tensors})
            print(f"  {outtype} ({'/'.join(types)}) as {cfg.architectures[0]}: max |logits - transformers| "
                  f"{(got['auto'] - ref).abs().max().item():.2e}; packed vs dequantized "
                  f"{(got['auto'] - got['none']).abs().max().item():.2e}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
