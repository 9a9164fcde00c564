"""Write a float GGUF (F32 tensors, same names, layout and metadata) from a quantized one, so that
llama-quantize can make its own Q8_0 / Q4_0 / Q4_K_M from the same weights ember runs.

usage: python benchmarks/gguf_to_float.py IN.gguf OUT.gguf
"""
from __future__ import annotations

import sys

import gguf
import numpy as np
from gguf.quants import dequantize


def main(src: str, dst: str) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        # GGUF lists dims fastest-first; numpy wants them the other way round.
        writer.add_tensor(t.name, data.reshape(tuple(reversed([int(d) for d in t.shape]))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
