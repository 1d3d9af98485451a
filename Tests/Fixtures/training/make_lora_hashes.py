"""Golden values for kohya's LoRA file hashes (Tests/TrainingTests/LoRAFileTests.swift).

Run from the repository root (PyTorch 2.13.0+cpu, safetensors):

    python3 Tests/Fixtures/training/make_lora_hashes.py

kohya's train_util.precalculate_safetensors_hashes / addnet_hash_safetensors / addnet_hash_legacy are copied
below verbatim (sd-scripts library/train_util.py). The tensors are a formula both sides compute identically
(value(i) = ((i * 7919) % 1000 - 500) / 1024, exact in fp16 and bf16), so no tensor data is committed; two
modules are large enough (> 1 MiB of data) that the legacy hash (64 KiB at offset 1 MiB) reads tensor bytes.
Writes lora_hashes.json: for each case, the tensor names/shapes/dtype, the metadata, and both hashes.
"""

import hashlib
import json
import os
from io import BytesIO

import safetensors.torch
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


# --- copied from kohya-ss/sd-scripts library/train_util.py -----------------------------------------
def addnet_hash_legacy(b):
    """Old model hash used by sd-webui-additional-networks for .safetensors format files"""
    m = hashlib.sha256()

    b.seek(0x100000)
    m.update(b.read(0x10000))
    return m.hexdigest()[0:8]


def addnet_hash_safetensors(b):
    """New model hash used by sd-webui-additional-networks for .safetensors format files"""
    hash_sha256 = hashlib.sha256()
    blksize = 1024 * 1024

    b.seek(0)
    header = b.read(8)
    n = int.from_bytes(header, "little")

    offset = n + 8
    b.seek(offset)
    for chunk in iter(lambda: b.read(blksize), b""):
        hash_sha256.update(chunk)

    return hash_sha256.hexdigest()


def precalculate_safetensors_hashes(tensors, metadata):
    """Precalculate the model hashes needed by sd-webui-additional-networks to
    save time on indexing the model later."""

    # Because writing user metadata to the file can change the result of
    # sd_models.model_hash(), only retain the training metadata for purposes of
    # calculating the hash, as they are meant to be immutable
    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}

    bytes = safetensors.torch.save(tensors, metadata)
    b = BytesIO(bytes)

    model_hash = addnet_hash_safetensors(b)
    legacy_hash = addnet_hash_legacy(b)
    return model_hash, legacy_hash
# ---------------------------------------------------------------------------------------------------


def formula(shape, dtype):
    n = 1
    for s in shape:
        n *= s
    i = torch.arange(n, dtype=torch.int64)
    return (((i * 7919) % 1000 - 500).to(torch.float32) / 1024).reshape(shape).to(dtype)


def case(name, dtype, modules, metadata):
    tensors = {}
    for m, (r, i, o) in modules.items():
        tensors[f"{m}.lora_down.weight"] = formula([r, i], dtype)
        tensors[f"{m}.lora_up.weight"] = formula([o, r], dtype)
        tensors[f"{m}.alpha"] = torch.tensor(float(r) / 2).to(dtype)
    model_hash, legacy_hash = precalculate_safetensors_hashes(tensors, metadata)
    return {
        "name": name,
        "dtype": {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}[dtype],
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "metadata": metadata,
        "sshs_model_hash": model_hash,
        "sshs_legacy_hash": legacy_hash,
    }


meta = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "16",
    "ss_output_name": "wai/character \"v1\"\tñ",
    "ss_tag_frequency": json.dumps({"img": {"1girl": 3, "smile": 1}}),
    "modelspec.title": "not hashed",
}
big = {
    "lora_unet_input_blocks_4_1_proj_in": (16, 640, 640),
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj": (16, 1280, 10240),
    "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_k": (16, 2048, 1280),
}
small = {"lora_unet_input_blocks_1_1_proj_out": (4, 32, 32)}
cases = [
    case("fp16 large", torch.float16, big, meta),
    case("bf16 large", torch.bfloat16, big, meta),
    case("fp32 small (legacy hash of an empty read)", torch.float32, small, {"ss_seed": "42"}),
    case("no ss_ metadata", torch.float16, small, {"modelspec.title": "x"}),
]
with open(os.path.join(HERE, "lora_hashes.json"), "w") as f:
    json.dump({"torch": torch.__version__, "safetensors": safetensors.__version__, "cases": cases}, f, indent=1,
              ensure_ascii=False)
print("wrote lora_hashes.json")
