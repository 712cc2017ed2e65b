"""Print a GGUF file's tensor block types and their counts (bench/kquant_dense.sh, bench/moe_cpu_peers.sh).
    usage: python bench/gguf_types.py FILE.gguf"""
import collections
import sys

from gguf import GGUFReader

r = GGUFReader(sys.argv[1])
print(sys.argv[1], "tensor types:", dict(collections.Counter(t.tensor_type.name for t in r.tensors)))
