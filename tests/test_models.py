import json

import pytest
import timm
import torch

from selfdistill.config import ModelConfig
from selfdistill.models import export_backbone, load_backbone
from selfdistill.models import Backbone, DINOHead


@pytest.mark.parametrize("name,kwargs,dim", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1), 192),
    ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1)), 192),
    ("resnet18", {}, 512),
])
def test_backbone_pooled_and_tokens_at_two_resolutions(name, kwargs, dim):
    b = Backbone(name, **kwargs).eval()
    for size in ((32, 16) if name.startswith("vit") else (224, 96) if name.startswith("swin") else (64, 32)):
        out = b(torch.randn(2, 3, size, size))
        assert out.pooled.shape == (2, dim)
        rows, cols = out.grid
        assert out.tokens.shape == (2, rows * cols, dim)
    if name.startswith("vit"):
        x = torch.randn(2, 3, 32, 32)
        feats = b.model.forward_features(x)
        assert torch.allclose(b(x).pooled, feats[:, 0])  # CLS token after the final norm
        assert b(x).grid == (4, 4)


def test_unknown_model_is_clear():
    with pytest.raises(ValueError, match="unknown timm model"):
        Backbone("vit_nonexistent_model")


def test_dino_head_structure_and_norm_last_layer():
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16, norm_last_layer=True)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(100), atol=1e-5)  # cosine classifier
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(64, 32), (64, 64), (16, 64)]
    assert any(isinstance(m, torch.nn.GELU) for m in head.mlp)
    assert head(torch.randn(4, 32)).shape == (4, 100)
    free = DINOHead(32, out_dim=10, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_export_is_loadable_by_timm(tmp_path):
    cfg = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, drop_path_rate=0.0, kwargs={"depth": 2})
    b = Backbone(cfg.name, cfg.img_size, cfg.patch_size, **cfg.kwargs).eval()
    path = export_backbone(b, tmp_path / "w.safetensors")
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["timm_name"] == cfg.name and "load_with" in info
    x = torch.randn(2, 3, 32, 32)
    m = timm.create_model(cfg.name, pretrained=True, num_classes=0, img_size=32, patch_size=8, depth=2,
                          pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert torch.allclose(m(x), b(x).pooled, atol=1e-6)
    # A fresh 10-class classifier on top of the exported backbone (fine-tuning) also loads.
    m10 = timm.create_model(cfg.name, pretrained=True, num_classes=10, img_size=32, patch_size=8, depth=2,
                            pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(m10.blocks[0].attn.qkv.weight, b.model.blocks[0].attn.qkv.weight)
    # Our own loader reads the metadata; no model name needed.
    b2, cfg2 = load_backbone(str(path))
    assert cfg2.name == cfg.name and torch.allclose(b2(x).pooled, b(x).pooled, atol=1e-6)


def test_load_backbone_refuses_mismatched_weights(tmp_path):
    cfg = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, kwargs={"depth": 2})
    path = export_backbone(Backbone(cfg.name, 32, 8, depth=2), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone(str(path), ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, kwargs={"depth": 3}))
    with pytest.raises(ValueError, match="does not fit"):  # same keys, other shapes
        load_backbone(str(path), ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8,
                                             kwargs={"depth": 2, "embed_dim": 48, "num_heads": 3}))


@pytest.mark.parametrize("name,kwargs,size", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1)), 224),
    ("resnet18", {}, 64),
])
def test_activation_checkpointing_gives_same_loss_and_gradients(name, kwargs, size):
    torch.manual_seed(0)
    plain = Backbone(name, **kwargs)
    ckpt = Backbone(name, grad_checkpointing=True, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    assert any(getattr(m, "grad_checkpointing", False) for m in ckpt.modules())
    assert not any(getattr(m, "grad_checkpointing", False) for m in plain.modules())
    x = torch.randn(2, 3, size, size)
    losses = []
    for model in (plain, ckpt):
        model.train()
        loss = model(x).pooled.square().mean()
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n


def test_pretrained_file_initialises_the_backbone(tmp_path):
    kw = dict(img_size=32, patch_size=8, depth=2)
    cfg = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, kwargs={"depth": 2})
    source = Backbone(cfg.name, **kw)
    path = export_backbone(source, tmp_path / "w.safetensors")
    loaded = Backbone(cfg.name, pretrained=str(path), **kw)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    # A timm checkpoint with a classifier (torch file, read with weights_only) loads too.
    full = timm.create_model(cfg.name, num_classes=5, **kw)
    torch.save(full.state_dict(), tmp_path / "with_head.pth")
    assert torch.equal(Backbone(cfg.name, pretrained=str(tmp_path / "with_head.pth"), **kw).model.pos_embed, full.pos_embed)
    with pytest.raises(FileNotFoundError, match="model.pretrained: no such file"):
        Backbone(cfg.name, pretrained=str(tmp_path / "missing.safetensors"), **kw)
    with pytest.raises(ValueError, match=r"model.pretrained: .* does not fit .*missing \d+ keys: blocks\.2"):
        Backbone(cfg.name, pretrained=str(path), img_size=32, patch_size=8, depth=3)


def test_dino_head_with_batchnorm_is_token_wise_on_token_maps():
    """Dense heads (GLSD, Patch-Wise DINO) take [B, T, D]: with BatchNorm each token's output must
    equal the head applied to all tokens as one flat batch (BN over features, not positions)."""
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=10, use_bn=True, hidden_dim=16, bottleneck_dim=4).train()
    tokens = torch.randn(3, 5, 8)
    out = head(tokens)
    assert out.shape == (3, 5, 10)
    assert torch.allclose(out, head(tokens.reshape(15, 8)).reshape(3, 5, 10), atol=1e-6)
