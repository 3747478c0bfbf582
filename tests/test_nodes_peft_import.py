"""Importing an official-style D-OPSD PEFT checkpoint (diffusers Z-Image names) onto a ComfyUI model."""
import json

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def lora_nodes(pack):
    from comfyui_dopsd.nodes import lora_nodes
    return lora_nodes


def _official_like_adapter(folder, dim, rank=2, alpha=4.0, seed=0):
    """What the official trainer saves with PeftModel.save_pretrained: diffusers module names."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("to_q", "to_k", "to_v"):
        key = f"base_model.model.layers.0.attention.{name}"
        tensors[key + ".lora_A.weight"] = torch.randn(rank, dim, generator=g) * 0.1
        tensors[key + ".lora_B.weight"] = torch.randn(dim, rank, generator=g) * 0.1
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["to_q", "to_k", "to_v"]}))
    return tensors


@pytest.fixture()
def loras(tmp_path):
    """models/loras in a temporary folder: adapters are picked from there, as in ComfyUI."""
    import folder_paths
    old = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], old[1])
    (tmp_path / "loras").mkdir()
    yield tmp_path / "loras"
    folder_paths.folder_names_and_paths["loras"] = old


def _qkv_weight(model):
    model.patch_model()
    try:
        return model.model.diffusion_model.layers[0].attention.qkv.weight.detach().clone()
    finally:
        model.unpatch_model()


def test_peft_import_patches_fused_qkv_exactly(lora_nodes, tiny_zimage, loras):
    dim = tiny_zimage.model.diffusion_model.layers[0].attention.qkv.weight.shape[1]
    tensors = _official_like_adapter(loras / "ckpt", dim)
    assert "ckpt" in lora_nodes.peft_adapters()
    base = _qkv_weight(tiny_zimage.clone())
    patched = lora_nodes.DOPSDImportPEFT.execute(tiny_zimage, "ckpt", 1.0, "")[0]
    got = _qkv_weight(patched)
    scale = 4.0 / 2
    delta = torch.cat([tensors[f"base_model.model.layers.0.attention.{n}.lora_B.weight"]
                       @ tensors[f"base_model.model.layers.0.attention.{n}.lora_A.weight"] * scale
                       for n in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(got, base + delta, rtol=1e-5, atol=1e-6)
    assert torch.equal(_qkv_weight(tiny_zimage.clone()), base)  # the input MODEL is untouched


def test_peft_import_errors(lora_nodes, tiny_zimage, tiny_flux2, loras):
    with pytest.raises(ValueError, match="is not among the adapters"):
        lora_nodes.DOPSDImportPEFT.execute(tiny_zimage, "missing", 1.0, "")
    _official_like_adapter(loras / "ckpt", 256)
    with pytest.raises(ValueError, match="match no weight of this model"):
        lora_nodes.DOPSDImportPEFT.execute(tiny_flux2, "ckpt", 1.0, "")
